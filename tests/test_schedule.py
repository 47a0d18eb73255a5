"""toolkit.schedule against fastai 0.7's ``CircularLR_beta``, torch's ``OneCycleLR`` and
values worked out by hand, plus the scheduler's mechanics (param groups, tensors, resume).

Every comparison reads the lr and beta1 the optimizer actually sees, from a step pre-hook,
so a scheduler that is off by one step, or writes into the wrong place, fails.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch

from toolkit.schedule import OneCycle, beta1_of, one_cycle

MOMS = (0.95, 0.85)
GROUP_SCALES = (1.0, 1 / 3, 1 / 9)  # discriminative lrs, as the post's fine-tuning used


def close(a: float, b: float, tol: float = 1e-12) -> bool:
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


# --- reference: fastai 0.7 CircularLR_beta, as in its source -------------------------------

def fastai_circular_lr_beta(it: int, nb: int, div: float, pct: float,
                            moms: tuple[float, float] = MOMS, *, ge: bool = False):
    """``(lr/max_lr, mom)`` of fastai 0.7's ``CircularLR_beta`` at iteration ``it`` of ``nb``.

    fastai's tests are strict ``>``; ``ge=True`` takes ``>=`` instead, to show that the
    branch chosen at an exact boundary does not matter.
    """
    cycle_nb = nb * (1 - pct) / 2
    mom1, mom2 = moms
    after = (lambda a, b: a >= b) if ge else (lambda a, b: a > b)
    if after(it, 2 * cycle_nb):
        p = (it - 2 * cycle_nb) / (nb - 2 * cycle_nb)
        lr = (1 + p * (1 - 100) / 100) / div
    elif after(it, cycle_nb):
        p = 1 - (it - cycle_nb) / cycle_nb
        lr = (1 + p * (div - 1)) / div
    else:
        p = it / cycle_nb
        lr = (1 + p * (div - 1)) / div
    if after(it, 2 * cycle_nb):
        mom = mom1
    elif after(it, cycle_nb):
        p = (it - cycle_nb) / cycle_nb
        mom = mom2 + p * (mom1 - mom2)
    else:
        p = it / cycle_nb
        mom = mom1 + p * (mom2 - mom1)
    return lr, mom


# --- helpers ---------------------------------------------------------------------------------

def _params(n_groups: int = len(GROUP_SCALES)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
            for _ in range(n_groups)]


def _groups(params, max_lr: float, *, tensor: bool = False, betas: bool = False) -> list[dict]:
    groups = []
    for p, scale in zip(params, GROUP_SCALES):
        g = {"params": [p], "lr": torch.tensor(max_lr * scale) if tensor else max_lr * scale}
        if betas and tensor:
            g["betas"] = (torch.tensor(0.9), torch.tensor(0.99))
        groups.append(g)
    return groups


def _make_opt(kind: str, params, max_lr: float, tensor: bool = False) -> torch.optim.Optimizer:
    groups = _groups(params, max_lr, tensor=tensor, betas=kind == "adamw")
    if kind == "adamw":
        return torch.optim.AdamW(groups, betas=(0.9, 0.99), weight_decay=0.01,
                                 foreach=False if tensor else None)
    return torch.optim.SGD(groups, momentum=0.9, weight_decay=0.01)


def _record(opt: torch.optim.Optimizer) -> list[list[tuple[float, float]]]:
    """``seen[k][g] = (lr, beta1)`` of group ``g`` as optimizer step ``k`` starts."""
    seen: list[list[tuple[float, float]]] = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(
        [(float(g["lr"]), beta1_of(g)) for g in o.param_groups]))
    return seen


def _train(opt, sched, params, steps: int) -> None:
    for _ in range(steps):
        for p in params:
            p.grad = torch.sin(p.detach()) + 0.1  # depends on params: trajectories diverge on any slip
        opt.step()
        sched.step()


# --- 1. fastai 0.7 CircularLR_beta ------------------------------------------------------------

# (nb, div, pct): the post's defaults, its 13.68% run, boundaries on and off integer steps.
FASTAI_CASES = [(100, 10.0, 0.1), (200, 25.0, 0.1), (1000, 10.0, 0.1368), (57, 20.0, 0.25),
                (20, 10.0, 0.2), (40, 5.0, 0.5)]


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("nb,div,pct", FASTAI_CASES)
def test_matches_fastai_circular_lr_beta(kind, nb, div, pct):
    max_lr = 0.3
    params = _params()
    opt = _make_opt(kind, params, max_lr)
    sched = OneCycle(opt, nb, div=div, pct=pct, moms=MOMS, lin_end=True)
    seen = _record(opt)
    _train(opt, sched, params, nb)
    assert len(seen) == nb
    for it, groups in enumerate(seen):
        ref_lr, ref_mom = fastai_circular_lr_beta(it, nb, div, pct)
        for (lr, mom), scale in zip(groups, GROUP_SCALES):
            assert close(lr, max_lr * scale * ref_lr), (it, lr, max_lr * scale * ref_lr)
            assert close(mom, ref_mom), (it, mom, ref_mom)


@pytest.mark.parametrize("nb,pct", [(100, 0.1), (200, 0.1), (20, 0.2), (40, 0.5)])
def test_fastai_boundaries_land_on_steps_and_agree(nb, pct):
    """At ``it == cycle_nb`` or ``2*cycle_nb`` fastai's strict ``>`` picks the earlier phase,
    ours the later one: both formulas give the same value there, and so do we."""
    div = 10.0
    cycle_nb = nb * (1 - pct) / 2
    hits = [it for it in range(nb) if it in (cycle_nb, 2 * cycle_nb)]
    assert len(hits) == 2  # the cases are chosen so the boundaries are whole steps
    for it in hits:
        strict = fastai_circular_lr_beta(it, nb, div, pct)
        loose = fastai_circular_lr_beta(it, nb, div, pct, ge=True)
        ours = one_cycle(it / nb, div=div, pct=pct)
        for a, b, c in zip(strict, loose, ours):
            assert close(a, b) and close(a, c), (it, strict, loose, ours)
    assert close(fastai_circular_lr_beta(hits[0], nb, div, pct)[0], 1.0)  # the peak
    assert close(fastai_circular_lr_beta(hits[1], nb, div, pct)[0], 1 / div)


# --- 2. torch.optim.lr_scheduler.OneCycleLR (three_phase, linear) ------------------------------

def _torch_phase(k: int, total: int, pct_start: float) -> tuple[int, float]:
    """Phase index and fraction within it of torch's step ``k``, as its ``get_lr`` computes."""
    ends = [float(pct_start * total) - 1, float(2 * pct_start * total) - 2, total - 1]
    start = 0.0
    for i, end in enumerate(ends):
        if k <= end or i == len(ends) - 1:
            return i, (k - start) / (end - start)
        start = end
    raise AssertionError


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("anneal", ["linear", "cos"])
@pytest.mark.parametrize("total,div,pct", [(100, 10.0, 0.1), (57, 25.0, 0.25),
                                           (1000, 10.0, 0.1368), (31, 4.0, 0.4)])
def test_shape_matches_torch_one_cycle_lr(kind, anneal, total, div, pct):
    """Torch's phases end at steps ``pct_start*T-1``, ``2*pct_start*T-2``, ``T-1``: map each of
    its steps to the same fraction of the same phase of ours and compare the shape."""
    max_lr = 1.0
    pct_start = (1 - pct) / 2
    half = (1 - pct) / 2
    params = _params(1)
    opt = _make_opt(kind, params, max_lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=max_lr, total_steps=total, pct_start=pct_start, anneal_strategy=anneal,
        three_phase=True, div_factor=div, final_div_factor=100.0,
        max_momentum=MOMS[0], base_momentum=MOMS[1])
    seen = _record(opt)
    _train(opt, sched, params, total)
    phases_seen = set()
    for k, [(lr, mom)] in enumerate(seen):
        phase, t = _torch_phase(k, total, pct_start)
        assert -1e-12 <= t <= 1 + 1e-12
        if anneal == "cos" and phase < 2:
            continue  # torch's "cos" bends the up and down ramps too; ours only the end
        phases_seen.add(phase)
        progress = (t * half, half + t * half, 2 * half + t * pct)[phase]
        ref_lr, ref_mom = one_cycle(progress, div=div, pct=pct, moms=MOMS,
                                    lin_end=anneal == "linear")
        assert close(lr / max_lr, ref_lr), (k, phase, t, lr, ref_lr)
        assert close(mom, ref_mom), (k, phase, t, mom, ref_mom)
    assert phases_seen == ({0, 1, 2} if anneal == "linear" else {2})
    assert close(seen[-1][0][0], max_lr / div / 100)  # torch ends exactly at the final lr


# --- 3. values by hand --------------------------------------------------------------------------

def _check(progress: float, lr: float, beta1: float, **kw) -> None:
    got = one_cycle(progress, **kw)
    assert close(got[0], lr) and close(got[1], beta1), (progress, kw, got, (lr, beta1))


def test_three_phase_by_hand():
    kw = dict(div=10.0, pct=0.1, moms=(0.95, 0.85))
    _check(0.0, 0.1, 0.95, **kw)            # start: max_lr/div, beta1 high
    _check(0.225, 0.55, 0.90, **kw)         # halfway up
    _check(0.45, 1.0, 0.85, **kw)           # peak: (1-pct)/2
    _check(0.675, 0.55, 0.90, **kw)         # halfway down
    _check(0.9, 0.1, 0.95, **kw)            # back at max_lr/div: 1-pct
    _check(1.0, 0.001, 0.95, **kw)          # lin_end: max_lr/(100*div)
    _check(0.95, 0.0505, 0.95, **kw)        # mid-anneal, linear
    _check(0.925, 0.1 - 0.099 / 4, 0.95, **kw)
    _check(-0.5, 0.1, 0.95, **kw)           # clamped
    _check(1.5, 0.001, 0.95, **kw)


def test_three_phase_cosine_end_by_hand():
    kw = dict(div=10.0, pct=0.1, lin_end=False)
    _check(0.9, 0.1, 0.95, **kw)
    _check(0.95, (0.1 + 0.001) / 2, 0.95, **kw)            # cosine midpoint = mean
    _check(0.925, 0.001 + 0.099 * (2 + 2 ** 0.5) / 4, 0.95, **kw)  # quarter: above linear
    _check(0.975, 0.001 + 0.099 * (2 - 2 ** 0.5) / 4, 0.95, **kw)
    _check(1.0, 0.001, 0.95, **kw)
    assert one_cycle(0.925, **kw)[0] > one_cycle(0.925, div=10.0, pct=0.1)[0] + 0.01


def test_other_div_moms_and_final_frac():
    kw = dict(div=25.0, pct=0.3, moms=(0.9, 0.8))
    _check(0.0, 0.04, 0.9, **kw)
    _check(0.35, 1.0, 0.8, **kw)
    _check(0.7, 0.04, 0.9, **kw)
    _check(1.0, 0.04 / 100, 0.9, **kw)
    _check(1.0, 0.0, 0.95, div=10.0, pct=0.1, final_frac=0.0)
    _check(0.95, 0.05, 0.95, div=10.0, pct=0.1, final_frac=0.0)
    _check(1.0, 0.0, 0.95, div=10.0, pct=0.1, final_frac=0.0, lin_end=False)
    _check(1.0, 0.5, 0.95, div=10.0, pct=0.1, final_frac=0.5)


PHASES4 = (7.5, 37.5, 37.5, 7.5)  # the post's language models, in epochs (90 in all)


def test_four_phase_by_hand():
    kw = dict(div=10.0, phases=PHASES4)
    _check(0.0, 0.1, 0.95, **kw)
    _check(7.5 / 90 / 2, 0.55, 0.90, **kw)             # halfway up
    _check(7.5 / 90, 1.0, 0.85, **kw)                  # after up: max_lr
    for epoch in (10, 20, 30, 40, 44.99, 45):          # plateau: flat, beta1 at moms[1]
        _check(epoch / 90, 1.0, 0.85, **kw)
    _check((45 + 37.5 / 2) / 90, 0.55, 0.90, **kw)     # halfway down
    _check(82.5 / 90, 0.1, 0.95, **kw)                 # after down: max_lr/div, moms[0]
    _check(86.25 / 90, 0.0505, 0.95, **kw)             # mid-anneal
    _check(1.0, 0.001, 0.95, **kw)
    _check(1.0, 0.0, 0.95, final_frac=0.0, **kw)
    _check(1.0, 0.001, 0.95, lin_end=False, **kw)
    _check(86.25 / 90, 0.0505, 0.95, lin_end=False, **kw)


def test_phases_unit_free_and_zero_plateau_is_three_phase():
    for x in [i / 97 for i in range(98)]:
        a = one_cycle(x, phases=PHASES4)
        b = one_cycle(x, phases=tuple(p / 90 for p in PHASES4))  # fractions instead of epochs
        assert close(a[0], b[0]) and close(a[1], b[1]), x
        c = one_cycle(x, div=25.0, pct=0.1)
        d = one_cycle(x, div=25.0, phases=(45, 0, 45, 10))
        assert close(c[0], d[0]) and close(c[1], d[1]), x


# --- 4. OneCycle mechanics --------------------------------------------------------------------

def test_writes_every_group_keeps_ratios_and_steps_after_optimizer():
    total, max_lr = 50, 0.01
    params = _params()
    opt = _make_opt("adamw", params, max_lr)
    sched = OneCycle(opt, total, div=10.0, pct=0.2)
    # set by the constructor for step 0, before any optimizer step
    assert all(close(g["lr"], max_lr * s / 10) for g, s in zip(opt.param_groups, GROUP_SCALES))
    assert all(g["betas"] == (0.95, 0.99) for g in opt.param_groups)
    seen = _record(opt)
    _train(opt, sched, params, total)
    for k, groups in enumerate(seen):
        factor, beta1 = one_cycle(k / total, div=10.0, pct=0.2)
        for (lr, b1), s in zip(groups, GROUP_SCALES):
            assert close(lr, max_lr * s * factor) and close(b1, beta1), (k, lr, b1)
        assert close(groups[1][0] / groups[0][0], 1 / 3) and close(groups[2][0] / groups[0][0], 1 / 9)
    assert all(g["betas"][1] == 0.99 for g in opt.param_groups)  # beta2 untouched
    assert seen[0] != seen[10] != seen[45]  # it did move
    assert sched.get_last_lr() == [g["lr"] for g in opt.param_groups]


def test_cycle_momentum_false_leaves_beta1():
    params = _params()
    opt = _make_opt("sgd", params, 0.1)
    sched = OneCycle(opt, 20, cycle_momentum=False)
    seen = _record(opt)
    _train(opt, sched, params, 20)
    assert all(b1 == 0.9 for groups in seen for _, b1 in groups)
    assert len({groups[0][0] for groups in seen}) > 10


def test_tensor_lr_and_betas_updated_in_place():
    total, max_lr = 40, 0.01
    params = _params()
    opt = _make_opt("adamw", params, max_lr, tensor=True)
    ids = [(id(g["lr"]), id(g["betas"][0]), id(g["betas"][1])) for g in opt.param_groups]
    sched = OneCycle(opt, total, div=10.0, pct=0.1)
    seen = _record(opt)
    for k in range(total):
        _train(opt, sched, params, 1)
        assert [(id(g["lr"]), id(g["betas"][0]), id(g["betas"][1]))
                for g in opt.param_groups] == ids, k
        assert all(isinstance(g["lr"], torch.Tensor) for g in opt.param_groups)
    for k, groups in enumerate(seen):
        factor, beta1 = one_cycle(k / total, div=10.0, pct=0.1)
        for (lr, b1), s in zip(groups, GROUP_SCALES):
            # float32 tensors: compare at float32 precision
            assert math.isclose(lr, max_lr * s * factor, rel_tol=1e-6), (k, lr)
            assert math.isclose(b1, beta1, rel_tol=1e-6), (k, b1)
    # the base lrs were copied, not aliased: the last lr is the end of the schedule
    assert all(math.isclose(float(g["lr"]), max_lr * s * one_cycle(1.0)[0], rel_tol=1e-6)
               for g, s in zip(opt.param_groups, GROUP_SCALES))
    assert all(float(g["betas"][1]) == pytest.approx(0.99) for g in opt.param_groups)


@pytest.mark.parametrize("kind,tensor", [("adamw", False), ("sgd", False), ("adamw", True)])
def test_state_dict_resume_equals_uninterrupted(kind, tensor):
    total, split, max_lr = 60, 23, 0.05
    shape = dict(div=20.0, phases=(1, 1, 2, 1), lin_end=False)

    params = _params()
    opt = _make_opt(kind, params, max_lr, tensor=tensor)
    sched = OneCycle(opt, total, **shape)
    full = _record(opt)
    _train(opt, sched, params, total)
    full_params = [p.detach().clone() for p in params]

    params = _params()
    opt = _make_opt(kind, params, max_lr, tensor=tensor)
    sched = OneCycle(opt, total, **shape)
    first = _record(opt)
    _train(opt, sched, params, split)
    ckpt = copy.deepcopy({"params": [p.detach() for p in params],
                          "opt": opt.state_dict(), "sched": sched.state_dict()})
    _train(opt, sched, params, 5)  # steps after the save must not leak into the checkpoint

    # a fresh process: new params, optimizer and scheduler (before loading, as torch asks)
    params = _params()
    with torch.no_grad():
        for p, saved in zip(params, ckpt["params"]):
            p.copy_(saved)
    opt = _make_opt(kind, params, max_lr, tensor=tensor)
    sched = OneCycle(opt, total, **shape)
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    assert sched.last_epoch == split
    rest = _record(opt)
    _train(opt, sched, params, total - split)

    assert first[:split] + rest == full  # same computation, so bit-identical
    assert all(torch.equal(p, q) for p, q in zip(params, full_params))
    assert len({groups[0] for groups in full}) > total // 2  # the schedule moved


@pytest.mark.parametrize("total", [0, -3])
def test_total_steps_below_one(total):
    opt = _make_opt("sgd", _params(), 0.1)
    with pytest.raises(ValueError, match=re.escape(f"total_steps={total}")):
        OneCycle(opt, total)


@pytest.mark.parametrize("kw,shown", [
    (dict(div=0.0), "div=0.0"),
    (dict(div=-10.0), "div=-10.0"),
    (dict(div=float("nan")), "div=nan"),
    (dict(pct=0.0), "pct=0.0"),
    (dict(pct=1.0), "pct=1.0"),
    (dict(pct=1.5), "pct=1.5"),
    (dict(pct=-0.1), "pct=-0.1"),
    (dict(moms=(0.95,)), "moms=(0.95,)"),
    (dict(moms=(1.0, 0.85)), "moms=(1.0, 0.85)"),
    (dict(moms=(0.95, -0.1)), "moms=(0.95, -0.1)"),
    (dict(moms=(0.95, 0.85, 0.9)), "moms=(0.95, 0.85, 0.9)"),
    (dict(phases=(1, 2, 3)), "phases=(1, 2, 3)"),
    (dict(phases=(1, -1, 1, 1)), "phases=(1, -1, 1, 1)"),
    (dict(phases=(0, 0, 0, 0)), "phases=(0, 0, 0, 0)"),
    (dict(phases=[1, 1, 1, 1, 1]), "phases=(1, 1, 1, 1, 1)"),
    (dict(final_frac=-0.1), "final_frac=-0.1"),
    (dict(final_frac=1.5), "final_frac=1.5"),
])
def test_bad_shape_raises_with_value(kw, shown):
    opt = _make_opt("adamw", _params(), 0.1)
    before = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match=re.escape(shown)):
        OneCycle(opt, 10, **kw)
    # rejected before touching the optimizer
    assert [{k: v for k, v in g.items() if k != "initial_lr"} for g in opt.param_groups] == before


def test_good_edges_accepted():
    opt = _make_opt("adamw", _params(), 0.1)
    OneCycle(opt, 1, final_frac=0.0, moms=(0.0, 0.0))
    OneCycle(opt, 1, final_frac=1.0, phases=(0, 0, 0, 1), pct=5.0)  # pct unused with phases


def test_load_state_dict_writes_the_restored_steps_values():
    """Elastic ZeRO shards (and any optimizer restored without its groups) come back with
    the step-0 lr and beta1: loading the schedule must write the restored step's values."""
    def fresh():
        opt = torch.optim.AdamW([torch.zeros(2, requires_grad=True)], lr=1.0, betas=(0.9, 0.99))
        return opt, OneCycle(opt, 50)
    opt, sched = fresh()
    for _ in range(17):
        opt.step()
        sched.step()
    want = (opt.param_groups[0]["lr"], opt.param_groups[0]["betas"][0])
    opt2, sched2 = fresh()
    assert opt2.param_groups[0]["lr"] != want[0]
    sched2.load_state_dict(sched.state_dict())
    assert (opt2.param_groups[0]["lr"], opt2.param_groups[0]["betas"][0]) == want
    assert sched2.get_last_lr() == sched.get_last_lr()
