"""Runs in stages: the two-stage digits run (head only, then every layer with discriminative
lrs, a fresh optimizer and a 1cycle each) resumes bitwise mid-stage-2, its frozen layers do
not move, and its one metrics.jsonl shows both cycles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import DIGITS, launch
from toolkit.checkpoint import weights as checkpoint_weights

ARGS = ["--freeze-epochs", "2", "--epochs", "2", "--freeze-lr", "1e-2", "--optim.lr", "3e-3",
        "--optim.lr-mults", "0.111", "0.333", "1", "--checkpoint-every", "11",
        "--keep-checkpoints", "20", "--no-progress"]
STEPS = 22  # per epoch: 1,437 training images // 64


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    """The model's weights in a checkpoint (DDP's file, or DeepSpeed's)."""
    return checkpoint_weights(run / "checkpoints" / f"step_{step}")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("stages") / "run"
    launch(DIGITS, ["--output-dir", str(run), *ARGS])
    return run


def test_two_stages_resume_bitwise_mid_stage_two(uninterrupted, tmp_path):
    resumed = tmp_path / "resumed"
    proc = launch(DIGITS, ["--output-dir", str(resumed), *ARGS, "--resume",
                           str(uninterrupted / "checkpoints" / "step_55")])
    assert "resumed from" in proc.stdout and "step 55/88" in proc.stdout
    a, b = weights(uninterrupted, 88), weights(resumed, 88)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_frozen_layers_stay_and_each_stage_starts_a_fresh_optimizer(uninterrupted):
    early, boundary, late = (weights(uninterrupted, s) for s in (11, 2 * STEPS, 3 * STEPS))
    head = "10."  # the Linear classifier, layer group 2
    for k in early:
        moved = not torch.equal(early[k], boundary[k])
        assert moved == k.startswith(head), k  # stage 1 trains the head alone
        assert not torch.equal(boundary[k], late[k]), k  # stage 2 trains everything
    # The checkpoint at the boundary already belongs to stage 2: an empty optimizer state.
    opt = torch.load(uninterrupted / "checkpoints" / f"step_{2 * STEPS}" / "optimizer.bin",
                     weights_only=False)
    assert opt["state"] == {}


def test_metrics_show_both_cycles(uninterrupted):
    rows = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train_loss" in r]
    stages = [r["stage"] for r in train]
    assert stages == sorted(stages) and set(stages) == {0, 1}
    for stage, top in ((0, 1e-2), (1, 3e-3)):
        lrs = [r["lr"] for r in train if r["stage"] == stage]
        peak = lrs.index(max(lrs))
        assert 0 < peak < len(lrs) - 1  # up, then down
        assert max(lrs) == pytest.approx(top, rel=0.05)
        assert lrs[-1] < top / 5  # annealing (rows every 5 steps)
    assert json.loads((uninterrupted / "results.json").read_text())["step"] == 4 * STEPS
    evals = [r for r in rows if "valid_accuracy" in r]
    assert [r["stage"] for r in evals] == [0, 0, 1, 1]


@pytest.fixture(scope="module")
def ddp_two(tmp_path_factory) -> Path:
    """The two-stage run with 2 processes under DDP (dropout streams are per rank)."""
    run = tmp_path_factory.mktemp("stages") / "ddp"
    launch(DIGITS, ["--output-dir", str(run), *ARGS], launcher="torchrun")
    return run


# zero2: 43 s, slow (CI runs it after the default run; test_zero covers ZeRO-2 resume by default)
@pytest.mark.parametrize("name", [pytest.param("zero2", marks=pytest.mark.slow), "fsdp2"])
def test_two_processes_take_the_stages_and_resume_exactly(name, ddp_two, tmp_path):
    """DeepSpeed steps the frozen groups at lr 0, FSDP2 stops their gradients as DDP does:
    the same weights as DDP with 2 processes, the frozen layers unmoved through stage 1, and
    a resume mid-stage-2 and at the boundary (a fresh optimizer, saved as fresh) bitwise."""
    args = [*ARGS, "--strategy", name]
    run, resumed = tmp_path / name, tmp_path / "resumed"
    proc = launch(DIGITS, ["--output-dir", str(run), *args], launcher="torchrun")
    assert f"({name})" in proc.stdout and "on 2 process(es)" in proc.stdout
    early, boundary = weights(run, 11), weights(run, 2 * STEPS)
    for k in early:
        assert torch.equal(early[k], boundary[k]) != k.startswith("10."), k
    # Through stage 1 and into stage 2; later, sums in another order (DeepSpeed's flat
    # buckets, FSDP2's reduce-scatter) grow from 1e-9 at step 44 to 1e-3 at step 88 (Adam on
    # near-zero gradients).
    for step in (2 * STEPS, 55):
        a, b = weights(ddp_two, step), weights(run, step)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    for step in (55, 2 * STEPS):
        launch(DIGITS, ["--output-dir", str(resumed / str(step)), *args, "--resume",
                        str(run / "checkpoints" / f"step_{step}")], launcher="torchrun")
        a, b = weights(run, 88), weights(resumed / str(step), 88)
        for k in a:
            assert torch.equal(a[k], b[k]), (step, k)


def test_bad_stage_setups_are_one_line(tmp_path):
    proc = launch(DIGITS, ["--output-dir", str(tmp_path / "a"), "--freeze-epochs", "1",
                           "--optim.lr-mults", "1", "2"], check=False)
    assert proc.returncode == 2 and "3 layer groups" in proc.stderr
    proc = launch(DIGITS, ["--output-dir", str(tmp_path / "b"), "--freeze-epochs", "1",
                           "--strategy", "zero2", "--clip", "1"], check=False)
    assert proc.returncode == 2 and "--clip" in proc.stderr.splitlines()[-1]
