"""The WikiText-2 recipe and the LM trainer, on the real data with a tiny model.

Data: ``$WIKITEXT2_DIR`` or ``<repo>/../shared/data/wikitext-2``; skipped when absent. The
recipe runs as a real program (``python`` / ``torchrun``), as a user would start it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, launch

WT2 = ROOT / "recipes" / "wt2.py"
DATA = Path(os.environ.get("WIKITEXT2_DIR", ROOT.parent / "shared" / "data" / "wikitext-2"))
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"no WikiText-2 at {DATA}")

# A tiny AWD-LSTM with an adaptive softmax; valid/test cut to 3,000 tokens so the final
# batch-size-1 and cache-pointer passes take a second.
TINY = ["--preset", "cpu-adam", "--data-dir", str(DATA), "--emb-size", "16", "--hidden-size", "24",
        "--bptt", "12", "--batch-size", "8", "--eval-batch-size", "4", "--eval-tokens", "3000",
        "--cache-bptt", "500", "--cache-window", "200", "--log-every", "1", "--no-progress",
        "--threads", "1"]
NO_DROPOUT = ["--dropouts", "0", "0", "0", "0", "0"]
RESULT_KEYS = {"valid_ppl", "valid_ppl_bs1", "test_ppl", "valid_cache_ppl", "test_cache_ppl"}


def recipe():
    """recipes/wt2.py as a module: its presets and builders."""
    from recipes import wt2
    return wt2


def in_process(monkeypatch) -> None:
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(var, raising=False)


def tiny(cfg, tmp_path: Path, **train):
    """The preset's training behaviour on a 2-layer 8-unit model without dropout."""
    return dataclasses.replace(
        cfg, emb_size=8, hidden_size=8, num_layers=2, cutoffs=None, dropouts=(0.0,) * 5,
        train=dataclasses.replace(cfg.train, output_dir=str(tmp_path), progress=False, **train))


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def final_params(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step}" / "model.safetensors")


def hidden(run: Path, step: int, rank: int = 0) -> list:
    """The rank's hidden state in a checkpoint (one per accumulation part; no accumulation
    here: part 0)."""
    state = torch.load(run / "checkpoints" / f"step_{step}" / f"trainer_{rank}.pt",
                       weights_only=False)
    return state["extra"]["hidden"][0]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("wt2") / "one"
    launch(WT2, [*TINY, *NO_DROPOUT, "--max-steps", "4", "--output-dir", str(run)])
    return run


def test_recipe_end_to_end_writes_perplexities(one_process):
    res = results(one_process)
    assert RESULT_KEYS <= set(res), res
    assert all(math.isfinite(res[k]) and 1 < res[k] < 1e5 for k in RESULT_KEYS), res
    assert res["step"] == 4
    assert (one_process / "config.json").is_file()
    rows = [json.loads(line) for line in (one_process / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train_loss" in r] == [1, 2, 3, 4]
    assert any("valid_ppl" in r for r in rows)
    assert list((one_process / "tensorboard").rglob("events.out.tfevents.*"))


def test_two_processes_each_train_their_columns(one_process, tmp_path):
    """Two ranks of 4 columns each equal one process of 8 (no dropout: nothing random)."""
    run = tmp_path / "two"
    launch(WT2, [*TINY, *NO_DROPOUT, "--max-steps", "4", "--output-dir", str(run)],
           launcher="torchrun")
    h0, h1 = hidden(run, 4, 0), hidden(run, 4, 1)
    assert h0[0][0].shape[1] == h1[0][0].shape[1] == 4  # each rank carries its 4 columns
    assert not torch.equal(h0[0][0], h1[0][0])
    # The single process's columns 0-3 and 4-7 are ranks 0 and 1.
    one = hidden(one_process, 4)
    for layer in range(2):
        for t in range(2):
            torch.testing.assert_close(torch.cat([h0[layer][t], h1[layer][t]], dim=1),
                                       one[layer][t], rtol=1e-4, atol=1e-5)
    assert results(run)["valid_ppl"] == pytest.approx(results(one_process)["valid_ppl"], rel=1e-4)
    # Batch size 1 cannot be split: every rank scored the whole stream, main wrote it.
    assert results(run)["test_cache_ppl"] == pytest.approx(
        results(one_process)["test_cache_ppl"], rel=1e-4)


@pytest.mark.slow  # CI runs it after the default run
def test_fsdp2_two_processes_equal_one(one_process, tmp_path):
    """The language model sharded with FSDP2 (the tied embedding stays with the root): its
    perplexities are one process's."""
    run = tmp_path / "fsdp2"
    proc = launch(WT2, [*TINY, *NO_DROPOUT, "--max-steps", "4", "--output-dir", str(run),
                        "--strategy", "fsdp2", "--checkpoint-every", "4"], launcher="torchrun")
    assert "(fsdp2)" in proc.stdout
    for key in ("valid_ppl", "test_ppl", "test_cache_ppl"):
        assert results(run)[key] == pytest.approx(results(one_process)[key], rel=1e-4), key


def test_accumulation_splits_the_columns_like_processes(one_process, tmp_path):
    """--grad-accum 2 in one process: two hidden states of 4 columns, which make up the
    one-step run's 8 columns, and the same training."""
    run = tmp_path / "accum"
    launch(WT2, [*TINY, *NO_DROPOUT, "--max-steps", "4", "--grad-accum", "2",
                 "--output-dir", str(run)])
    state = torch.load(run / "checkpoints" / "step_4" / "trainer_0.pt", weights_only=False)
    parts, one = state["extra"]["hidden"], hidden(one_process, 4)
    assert sorted(parts) == [0, 1] and parts[0][0][0].shape[1] == 4
    for layer in range(2):
        for t in range(2):
            torch.testing.assert_close(torch.cat([parts[0][layer][t], parts[1][layer][t]], 1),
                                       one[layer][t], rtol=1e-4, atol=1e-5)
    assert results(run)["valid_ppl"] == pytest.approx(results(one_process)["valid_ppl"], rel=1e-4)


def test_resume_mid_epoch_is_exact(tmp_path):
    """Resumed from step 3 of a ~20k-batch epoch, hidden state and dropout RNG included."""
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    args = [*TINY, "--no-cache", "--max-steps", "7", "--keep-checkpoints", "10"]
    launch(WT2, [*args, "--checkpoint-every", "3", "--output-dir", str(ref)])
    assert hidden(ref, 3) is not None
    out = launch(WT2, [*args, "--output-dir", str(resumed),
                       "--resume", str(ref / "checkpoints" / "step_3")])
    assert "resumed from" in out.stdout
    a, b = final_params(ref, 7), final_params(resumed, 7)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    for la, lb in zip(hidden(ref, 7), hidden(resumed, 7)):
        assert all(torch.equal(x, y) for x, y in zip(la, lb))


def test_missing_data_dir_is_one_line(tmp_path):
    proc = launch(WT2, ["--preset", "cpu", "--data-dir", str(tmp_path / "nowhere"),
                        "--output-dir", str(tmp_path / "run")], check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--data-dir" in lines[0], \
        proc.stderr


# sgugger/Adam-experiments (the post's code): README.md's commands
#   python train_rnn.py 5e-3 --wd=1.2e-6 --alpha=3 --beta=1.5       (AWD-LSTM)
#   python train_rnn.py 5e-3 --wd=1e-6 --qrnn=True                   (AWD-QRNN)
# on train_rnn.py's train_lm defaults: moms (0.8, 0.7), beta2 0.99, wd_loss True (L2), bs 100,
# bptt 70, div 10, nbs (7.5, 37.5, 37.5, 7.5), lin_end False (cosine to 0), clip 0.12,
# alpha 2, beta 1, bias True; drops (0.6, 0.4, 0.5, 0.1, 0.2), QRNN (0.4, 0.4, 0.1, 0.1, 0.2);
# em_sz 400, nh 1150 / 1550, nl 3 / 4; fastai 0.7's LanguageModelLoader and Stepper.step.
POST = {
    "paper-lstm": dict(model="lstm", hidden_size=1150, num_layers=3, wd=1.2e-6, alpha=3.0,
                       beta=1.5, dropouts=(0.6, 0.4, 0.5, 0.1, 0.2)),
    "paper-qrnn": dict(model="qrnn", hidden_size=1550, num_layers=4, wd=1e-6, alpha=2.0,
                       beta=1.0, dropouts=(0.4, 0.4, 0.1, 0.1, 0.2)),
}


@pytest.mark.parametrize("preset", ["paper-lstm", "paper-lstm-adamw", "paper-qrnn"])
def test_paper_presets_are_the_posts_commands(preset):
    cfg = recipe().PRESETS[preset]()
    post = POST.get(preset, POST["paper-lstm"])
    assert (cfg.model, cfg.emb_size, cfg.hidden_size, cfg.num_layers, cfg.dropouts) == \
        (post["model"], 400, post["hidden_size"], post["num_layers"], post["dropouts"])
    assert (cfg.alpha, cfg.beta, cfg.ar_on) == (post["alpha"], post["beta"], "raw")
    assert (cfg.bptt, cfg.batching, cfg.lr_scale_seq_len, cfg.cutoffs) == \
        (70, "fastai", False, None)
    t, o, sch = cfg.train, cfg.optim, cfg.schedule
    assert (t.epochs, t.batch_size, t.clip, t.grad_accum) == (90, 100, 0.12, 1)
    assert (o.lr, o.betas, o.eps, o.amsgrad, o.no_decay_bias_norm) == \
        (5e-3, (0.8, 0.99), 1e-8, False, False)  # torch Adam's defaults otherwise; all decayed
    if preset == "paper-lstm-adamw":
        assert (o.name, o.wd) == ("adamw", 0.1)  # no such command in the post's repository
    else:
        assert (o.name, o.wd) == ("adam", post["wd"])
    assert (sch.div, sch.phases, sch.moms, sch.lin_end, sch.final_frac) == \
        (10, (7.5, 37.5, 37.5, 7.5), (0.8, 0.7), False, 0.0)


@pytest.mark.parametrize("preset", ["paper-lstm", "paper-lstm-adamw", "paper-qrnn", "cpu"])
def test_ar_of_the_built_model_is_fastai_seq2seq_reg_for_paper_presets(preset, tmp_path):
    """fastai 0.7's seq2seq_reg: alpha * mean(outputs[-1]**2), RNN_Encoder's last output,
    which LinearDecoder drops only for its own use; the cpu preset keeps salesforce's AR on
    the dropped output, with which its perplexity was measured."""
    wt2 = recipe()
    cfg = dataclasses.replace(tiny(wt2.PRESETS[preset](), tmp_path),
                              dropouts=(0.0, 0.5, 0.0, 0.0, 0.0))  # only the output dropout
    assert cfg.ar_on == ("dropped" if preset == "cpu" else "raw")
    torch.manual_seed(0)
    model = wt2.build_model(cfg, 50).double()
    tokens = torch.randint(0, 50, (9, 4))
    _, raw, _, _ = model.eval()(tokens, tokens, model.init_hidden(4))
    _, dropped, _, pen = model.train()(tokens, tokens, model.init_hidden(4))
    reference = raw if preset != "cpu" else dropped
    other = dropped if preset != "cpu" else raw
    assert pen.ar.item() == pytest.approx(cfg.alpha * reference.pow(2).mean().item(), rel=1e-12)
    assert pen.ar.item() != pytest.approx(cfg.alpha * other.pow(2).mean().item(), rel=1e-3)


def fastai_cycle(nb: int, lr: float = 5e-3, div: float = 10, nbs=(7.5, 37.5, 37.5, 7.5)):
    """(lr, beta1) of every batch of Adam-experiments' get_phases under fastai 0.7's fit,
    OptimScheduler and DecayScheduler (old/fastai/sgdr.py, model.py), read literally."""
    def value(kind, start, end, it, n):  # DecayScheduler.next_val after `it` calls
        if kind == "no":
            return start
        if kind == "linear":
            return start + it / n * (end - start)
        return end + (start - end) / 2 * (math.cos(math.pi * it / n) + 1)  # cosine to 0

    phases = [("linear", lr / div, lr, "linear", 0.8, 0.7), ("no", lr, None, "no", 0.7, None),
              ("linear", lr, lr / div, "linear", 0.7, 0.8),
              ("cosine", lr / div, 0, "no", 0.8, None)]
    ends = [sum(nbs[:i + 1]) * nb for i in range(4)]  # cnt_phases
    out, phase, it, batch_num = [], 0, 0, 0
    while phase < 4:
        kind, lr0, lr1, mkind, m0, m1 = phases[phase]
        n = nbs[phase] * nb
        out.append((value(kind, lr0, lr1, it, n), value(mkind, m0, m1, it, n)))
        batch_num, it = batch_num + 1, it + 1  # on_batch_end: the phase's update()
        if batch_num >= ends[phase]:
            phase, it = phase + 1, 0  # on_phase_begin: the next phase's start values
    return out


def test_paper_cycle_is_fastai_training_phases():
    """The 1cycle of the paper presets, step by step, against fastai 0.7's phases over
    90 epochs of 297 batches; only the cosine anneal runs half a step ahead."""
    cfg = recipe().Config()
    reference = fastai_cycle(297)
    assert len(reference) == 90 * 297
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    sched = cfg.schedule.build(opt, len(reference))
    ours = torch.tensor([sched.values(step) for step in range(len(reference))],
                        dtype=torch.float64)
    lr_gap = (ours[:, 0] - torch.tensor(reference, dtype=torch.float64)[:, 0] / cfg.optim.lr).abs()
    beta1_gap = (ours[:, 1] - torch.tensor(reference, dtype=torch.float64)[:, 1]).abs()
    anneal = 24_503  # fastai's last phase starts on the batch after 24,502.5
    assert beta1_gap.max() < 1e-12 and lr_gap[:anneal].max() < 1e-12
    assert 1e-5 < lr_gap[anneal:].max() < 4e-5  # half a step of the cosine, in units of max lr


def test_paper_lstm_epoch_on_the_real_data_is_fastai_297_steps(tmp_path, monkeypatch):
    """fastai 0.7's LanguageModelLoader: rows // bptt - 1 = 20,886 // 70 - 1 = 297 batches
    per epoch at batch size 100 (salesforce's loop: 308.7 on average), the first bptt + 25."""
    in_process(monkeypatch)
    from toolkit.lm.data import load_wikitext2

    wt2 = recipe()
    corpus = load_wikitext2(DATA, cache_dir=tmp_path / "cache")
    cfg = tiny(wt2.PRESETS["paper-lstm"](), tmp_path / "run")
    torch.manual_seed(0)
    trainer = wt2.build_trainer(cfg, wt2.build_model(cfg, corpus.vocab_size), corpus.train,
                                None)
    try:
        stream = trainer.train_data.streams[0]
        assert stream.rows == 20_886 and stream.rows // 70 - 1 == 297
        assert [stream.num_batches(e) for e in range(90)] == [297] * 90
        assert trainer.total_steps == 90 * 297
        assert stream.seq_lens(0)[0] == 95
        assert trainer.epoch_at(297) == 1.0 and trainer.epoch_at(297 * 45 + 99) == 45 + 99 / 297
    finally:
        trainer.close()


@pytest.mark.parametrize("preset", ["paper-lstm", "paper-qrnn", "cpu"])
def test_lr_of_each_step_is_the_schedule_scaled_only_for_salesforce(preset, tmp_path,
                                                                    monkeypatch):
    """Read inside the optimizer step (a pre-hook), against the schedule's pure function:
    the paper presets step at the schedule's lr (fastai 0.7's Stepper.step); the cpu preset
    keeps salesforce's seq_len / bptt."""
    in_process(monkeypatch)
    wt2 = recipe()
    cfg = dataclasses.replace(tiny(wt2.PRESETS[preset](), tmp_path, max_steps=6, batch_size=4),
                              bptt=20)
    scaled = preset == "cpu"
    assert cfg.lr_scale_seq_len == scaled and cfg.batching == ("salesforce" if scaled
                                                                 else "fastai")
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (4000,))
    trainer = wt2.build_trainer(cfg, wt2.build_model(cfg, 50), ids, None)
    seen = []
    trainer.scheduler.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append([g["lr"] for g in opt.param_groups]))
    trainer.fit()
    trainer.close()
    lens = trainer.train_data.streams[0].seq_lens(0)[:6]
    assert len(set(lens)) > 1  # variable lengths, so a factor would show
    base = trainer.scheduler.base_lrs
    for step, (lrs, seq_len) in enumerate(zip(seen, lens, strict=True)):
        factor = trainer.scheduler.values(step)[0] * (seq_len / 20 if scaled else 1)
        assert lrs == pytest.approx([b * factor for b in base], rel=1e-12)
