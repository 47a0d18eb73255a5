"""The WikiText-2 recipe and the LM trainer, on the real data with a tiny model.

Data: ``$WIKITEXT2_DIR`` or ``<repo>/../shared/data/wikitext-2``; skipped when absent. The
recipe runs as a real program (``python`` / ``torchrun``), as a user would start it.
"""

from __future__ import annotations

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
TINY = ["--preset", "cpu", "--data-dir", str(DATA), "--emb-size", "16", "--hidden-size", "24",
        "--bptt", "12", "--batch-size", "8", "--eval-batch-size", "4", "--eval-tokens", "3000",
        "--cache-bptt", "500", "--cache-window", "200", "--log-every", "1", "--no-progress",
        "--threads", "1"]
NO_DROPOUT = ["--dropouts", "0", "0", "0", "0", "0"]
RESULT_KEYS = {"valid_ppl", "valid_ppl_bs1", "test_ppl", "valid_cache_ppl", "test_cache_ppl"}


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def final_params(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step}" / "model.safetensors")


def hidden(run: Path, step: int, rank: int = 0) -> list:
    state = torch.load(run / "checkpoints" / f"step_{step}" / f"trainer_{rank}.pt",
                       weights_only=False)
    return state["extra"]["hidden"]


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


def test_lr_of_each_step_is_schedule_lr_times_seq_len_over_bptt(tmp_path, monkeypatch):
    """Read inside the optimizer step (a pre-hook), against the schedule's pure function."""
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(var, raising=False)
    from toolkit.config import OptimConfig, ScheduleConfig, TrainConfig
    from toolkit.lm import LanguageModel, LMTrainer
    from toolkit.models.awd_lstm import AWDLSTM

    torch.manual_seed(0)
    ids = torch.randint(0, 50, (4000,))
    model = LanguageModel(AWDLSTM(50, 8, 8, 1, dropouti=0, dropout=0, wdrop=0, dropoute=0,
                                  dropouth=0))
    trainer = LMTrainer(
        model, ids, None, bptt=20, train=TrainConfig(output_dir=str(tmp_path), max_steps=6,
                                                     batch_size=4, progress=False),
        optim=OptimConfig(name="adam", lr=1e-2), schedule=ScheduleConfig(div=10, pct=0.3))
    seen = []
    trainer.scheduler.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append([g["lr"] for g in opt.param_groups]))
    trainer.fit()
    trainer.close()
    lens = trainer.stream.seq_lens(0)[:6]
    assert len(set(lens)) > 1  # variable lengths, so the factor is really exercised
    base = trainer.scheduler.base_lrs
    for step, (lrs, seq_len) in enumerate(zip(seen, lens, strict=True)):
        factor = trainer.scheduler.values(step)[0] * seq_len / 20
        assert lrs == pytest.approx([b * factor for b in base], rel=1e-12)
