"""The CIFAR-10 recipe on the real data (skipped without it): a few steps of a narrow
ResNet-9 in one process, under 2 processes with ZeRO-2 (equal to one process: the on-device
augmentation draws the same numbers for every example), an exact resume mid-epoch, TTA in
results.json, and the run contracts. The full ``cpu`` preset run is ``slow``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import ROOT, launch
from test_stages import weights
from toolkit.recipe import load_model

CIFAR = ROOT / "recipes" / "cifar10.py"
DATA = Path(os.environ.get("CIFAR10_DIR", ROOT.parent / "shared/data/cifar-10-batches-bin"))
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"no CIFAR-10 at {DATA}")
SMALL = ["--preset", "cpu-adamw", "--data-dir", str(DATA), "--width", "4", "--batch-size", "64",
         "--max-steps", "6", "--checkpoint-every", "3", "--keep-checkpoints", "5",
         "--no-progress"]


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cifar") / "one"
    launch(CIFAR, [*SMALL, "--output-dir", str(run)], timeout=600)
    return run


def test_a_few_steps_write_the_run_contracts(one):
    results = json.loads((one / "results.json").read_text())
    for key in ("valid_accuracy", "plain_accuracy", "tta_accuracy", "tta_fixed_accuracy"):
        assert 0 <= results[key] <= 1, key
    assert results["plain_accuracy"] == pytest.approx(results["valid_accuracy"], abs=1e-4)
    assert (one / "config.json").is_file() and (one / "metrics.jsonl").is_file()
    final, reloaded = weights(one, 6), load_model(one).state_dict()  # model.safetensors
    assert final.keys() == reloaded.keys()
    for k in final:
        assert torch.equal(final[k], reloaded[k]), k


def test_a_holdout_run_says_it_scored_the_holdout(tmp_path):
    proc = launch(CIFAR, [*SMALL, "--output-dir", str(tmp_path / "h"), "--holdout", "500",
                          "--max-steps", "1", "--no-tta"], timeout=600)
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("holdout accuracy "), last


@pytest.mark.slow  # 30 s: CI runs it after the default run (the digits tests resume by default)
def test_resume_mid_epoch_is_exact(one, tmp_path):
    resumed = tmp_path / "resumed"
    launch(CIFAR, [*SMALL, "--output-dir", str(resumed), "--resume",
                   str(one / "checkpoints" / "step_3")], timeout=600)
    a, b = weights(one, 6), weights(resumed, 6)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow  # 49 s: CI runs it after the default run (digits covers ZeRO-2 by default)
def test_two_processes_zero2_train_like_one_and_resume_exactly(one, tmp_path):
    run = tmp_path / "zero2"
    proc = launch(CIFAR, [*SMALL, "--output-dir", str(run), "--strategy", "zero2",
                          "--sync-batchnorm"], launcher="torchrun", timeout=600)
    assert "DEEPSPEED (zero2)" in proc.stdout and "on 2 process(es)" in proc.stdout
    a, b = weights(one, 6), weights(run, 6)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    resumed = tmp_path / "zero2-resumed"
    launch(CIFAR, [*SMALL, "--output-dir", str(resumed), "--strategy", "zero2",
                   "--sync-batchnorm", "--resume", str(run / "checkpoints" / "step_3")],
           launcher="torchrun", timeout=600)
    a, b = weights(run, 6), weights(resumed, 6)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_cpu_preset_beats_the_baseline(tmp_path):
    """The `cpu` preset in full (7 minutes on 2 cores, with torch's threads as it was
    measured): at the goal's 90% (measured 90.22% and, seed 1, 90.52%; the bound leaves half a
    point to another CPU's reduction order), far above the 87.3% of the plain ResNet-9 baseline, and
    test-time augmentation does not lose accuracy. Resumed at its end, the run reports the
    same results."""
    run = tmp_path / "cpu"
    threads = str(torch.get_num_threads())
    launch(CIFAR, ["--preset", "cpu", "--data-dir", str(DATA), "--output-dir", str(run),
                   "--no-progress"], timeout=2300, OMP_NUM_THREADS=threads)
    results = json.loads((run / "results.json").read_text())
    assert results["valid_accuracy"] >= 0.895, results
    assert results["tta_accuracy"] >= results["plain_accuracy"], results
    (run / "results.json").unlink()
    launch(CIFAR, ["--preset", "cpu", "--data-dir", str(DATA), "--output-dir", str(run),
                   "--no-progress", "--resume", "auto"], timeout=600, OMP_NUM_THREADS=threads)
    again = json.loads((run / "results.json").read_text())
    assert again["valid_accuracy"] == results["valid_accuracy"]
