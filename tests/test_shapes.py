"""The 1cycle shapes users know today (``--schedule.shape``), step by step against their
sources: fastai v2's ``fit_one_cycle`` and ``fit_flat_cos`` (a transcription of its code,
below), torch's ``OneCycleLR`` (torch's own class, run beside ours), and the WSD cooldowns
against their formulas. Each comparison reads the lr and beta1 that the optimizer sees as
each step starts, for every param group (discriminative lrs keep their ratios)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from conftest import TINY, dumps, launch
from test_schedule import GROUP_SCALES, _make_opt, _params, _record, _train
from toolkit.config import ScheduleConfig, FastaiShape, FlatCosShape, TorchShape, WSDShape, parse
from toolkit.errors import UserError


# --- fastai v2 (fastai/callback/schedule.py, fastai 2.7: sched_cos, combine_scheds,
# ParamScheduler's pct_train = train_iter / n_iter, fit_one_cycle, fit_flat_cos) -------------
def sched_cos(start, end, pos):
    return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


def combine_scheds(pcts, scheds):
    pcts = torch.tensor([0] + list(pcts))  # float32, as fastai's `tensor`
    assert torch.all(pcts >= 0)
    pcts = torch.cumsum(pcts, 0)
    pct_lim = len(pcts) - 2

    def _inner(pos):
        idx = min((pos >= pcts).nonzero().max(), pct_lim)
        actual_pos = (pos - pcts[idx]) / (pcts[idx + 1] - pcts[idx])
        return scheds[idx](actual_pos.item())
    return _inner


def combined_cos(pct, start, middle, end):
    return combine_scheds([pct, 1 - pct], [lambda p: sched_cos(start, middle, p),
                                           lambda p: sched_cos(middle, end, p)])


def fastai_fit_one_cycle(lr_max, div=25., div_final=1e5, pct_start=0.25,
                         moms=(0.95, 0.85, 0.95)):
    return (combined_cos(pct_start, lr_max / div, lr_max, lr_max / div_final),
            combined_cos(pct_start, *moms))


def fastai_fit_flat_cos(lr, div_final=1e5, pct_start=0.75):
    return combine_scheds([pct_start, 1 - pct_start],
                          [lambda p: lr, lambda p: sched_cos(lr, lr / div_final, p)])


# fastai computes the position within a phase in float32 (its `tensor` of phase ends, e.g.
# 0.9 -> 0.8999999762): that rounding moves its lr by up to ~5e-7 of the peak lr.
F32 = 1e-6 * 0.3


def ours(shape: str, steps: int, kind: str = "adamw", **section):
    """What our scheduler gives each step: ``seen[k][g] = (lr, beta1)``."""
    params = _params()
    opt = _make_opt(kind, params, 0.3)
    cfg = ScheduleConfig(shape=shape)
    name = {"fastai": "fastai", "flat-cos": "flat_cos", "torch": "pytorch", "wsd": "wsd"}[shape]
    cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **section)})
    cfg.validate()
    seen = _record(opt)
    _train(opt, cfg.build(opt, steps), params, steps)
    return seen


FASTAI = [{}, {"div": 10.0, "div_final": 1e4, "pct_start": 0.3, "moms": (0.9, 0.8, 0.9)},
          {"div": 5.0, "pct_start": 0.5}]


@pytest.mark.parametrize("steps", [100, 57])
@pytest.mark.parametrize("section", FASTAI)
def test_fastai_fit_one_cycle_step_by_step(section, steps):
    lr_sched, mom_sched = fastai_fit_one_cycle(0.3, **section)
    for k, groups in enumerate(ours("fastai", steps, **section)):
        pos = k / steps
        for (lr, beta1), scale in zip(groups, GROUP_SCALES):
            assert lr == pytest.approx(lr_sched(pos) * scale, rel=1e-6, abs=F32), (k, pos)
            assert beta1 == pytest.approx(mom_sched(pos), rel=1e-6), (k, pos)


@pytest.mark.parametrize("steps", [100, 57])
@pytest.mark.parametrize("section", [{}, {"pct_start": 0.5, "div_final": 100.0},
                                     {"pct_start": 0.9}])
def test_fastai_fit_flat_cos_step_by_step_leaves_beta1(section, steps):
    lr_sched = fastai_fit_flat_cos(0.3, **section)
    for k, groups in enumerate(ours("flat-cos", steps, **section)):
        for (lr, beta1), scale in zip(groups, GROUP_SCALES):
            assert lr == pytest.approx(lr_sched(k / steps) * scale, rel=1e-6, abs=F32), k
            assert beta1 == 0.9  # the optimizer's own


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("section", [{}, {"three_phase": True}, {
    "pct_start": 0.25, "div_factor": 10.0, "final_div_factor": 100.0, "anneal_strategy": "linear",
    "base_momentum": 0.8, "max_momentum": 0.9}])
@pytest.mark.parametrize("steps", [100, 37])
def test_torch_one_cycle_lr_step_by_step(section, steps, kind):
    params = _params()
    opt = _make_opt(kind, params, 0.3)
    seen = _record(opt)
    torch_sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[0.3 * s for s in GROUP_SCALES], total_steps=steps, **section)
    _train(opt, torch_sched, params, steps)
    for k, (theirs, mine) in enumerate(zip(seen, ours("torch", steps, kind, **section))):
        for (lr_t, b_t), (lr_o, b_o) in zip(theirs, mine):
            assert lr_o == pytest.approx(lr_t, rel=1e-9, abs=1e-15), k
            assert b_o == pytest.approx(b_t, rel=1e-9), k


@pytest.mark.parametrize("kind", ["linear", "cosine", "1-sqrt"])
def test_wsd_cooldowns_are_their_formulas(kind):
    steps, warm, cool, final = 200, 0.1, 0.25, 0.01
    decay = {"linear": lambda t: 1 - t, "cosine": lambda t: 0.5 * (1 + math.cos(math.pi * t)),
             "1-sqrt": lambda t: 1 - t ** 0.5}[kind]
    seen = ours("wsd", steps, warmup=warm, cooldown=cool, cooldown_kind=kind, final_frac=final)
    for k, groups in enumerate(seen):
        x = k / steps
        want = x / warm if x < warm else 1.0 if x < 1 - cool else \
            final + (1 - final) * decay((x - (1 - cool)) / cool)
        for (lr, beta1), scale in zip(groups, GROUP_SCALES):
            assert lr == pytest.approx(0.3 * scale * want, rel=1e-12, abs=1e-15), k
            assert beta1 == 0.9
    # Warm-up from 0, flat at the peak, cooling down to final_frac in its last step's reach.
    assert seen[0][0][0] == 0.0 and seen[100][0][0] == pytest.approx(0.3)
    assert seen[-1][0][0] < 0.3 * 0.2


def test_a_run_logs_the_lr_and_beta1_each_step_used(tmp_path):
    run = tmp_path / "run"
    launch(TINY, ["--output-dir", str(run), "--dump", str(tmp_path / "d"), "--schedule.shape",
                  "fastai", "--optim.lr", "0.01"])
    used = dumps(tmp_path / "d", 1)[0]["schedule"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in rows if "train_loss" in r}
    lr_sched, mom_sched = fastai_fit_one_cycle(0.01)
    assert len(used) == 20 and set(logged) == set(range(1, 21))
    for k, step in enumerate(used):
        assert step["lr"] == pytest.approx(lr_sched(k / 20), rel=1e-6, abs=1e-6 * 0.01)
        assert step["beta1"] == pytest.approx(mom_sched(k / 20), rel=1e-6)
        # The row of step k+1 is logged after it with the lr and beta1 it used.
        assert logged[k + 1]["lr"] == pytest.approx(step["lr"], rel=1e-12)
        assert logged[k + 1]["beta1"] == pytest.approx(step["beta1"], rel=1e-12)


def digits_presets():
    from recipes import digits
    return digits.PRESETS


@pytest.mark.parametrize("args, says", [
    (["--schedule.fastai.div", "10"], "--schedule.fastai.* is set but --schedule.shape is post"),
    (["--schedule.shape", "torch", "--schedule.wsd.cooldown", "0.3"], "--schedule.wsd.*"),
    (["--schedule.shape", "wsd", "--schedule.wsd.warmup", "0.9"], "more than the run"),
    (["--schedule.shape", "fastai", "--schedule.fastai.pct-start", "1.5"], "pct-start=1.5"),
    (["--schedule.shape", "torch", "--schedule.pytorch.three-phase",
      "--schedule.pytorch.pct-start", "0.6"], "<= 0.5"),
    (["--schedule.shape", "cosine"], "cosine"),
    (["--schedule.shape", "torch", "--schedule.pytorch.pct-start", "1.0"], "in (0, 1)"),
])
def test_bad_shape_flags_are_one_line(args, says):
    with pytest.raises(UserError) as e:
        parse(digits_presets(), args)
    assert says in str(e.value) and "\n" not in str(e.value).strip()


def test_a_torch_phase_without_a_step_is_one_line():
    # pct_start x steps = 1: torch's own OneCycleLR divides by zero there.
    with pytest.raises(UserError, match="leaves a phase without a step"):
        ours("torch", 10, pct_start=0.1)


def test_each_section_defaults_are_its_sources():
    assert dataclasses.asdict(FastaiShape()) == {"div": 25.0, "div_final": 1e5,
                                                 "pct_start": 0.25, "moms": (0.95, 0.85, 0.95)}
    assert dataclasses.asdict(FlatCosShape()) == {"pct_start": 0.75, "div_final": 1e5}
    import inspect
    torch_defaults = {k: v.default for k, v in inspect.signature(
        torch.optim.lr_scheduler.OneCycleLR).parameters.items() if k in vars(TorchShape())}
    assert dataclasses.asdict(TorchShape()) == torch_defaults
    assert WSDShape().cooldown_kind == "1-sqrt"
