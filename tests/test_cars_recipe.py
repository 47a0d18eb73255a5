"""The Stanford Cars recipe on generated copies in both real layouts: its two stages (the
body frozen with its BatchNorm statistics, then everything), an exact resume mid-stage-2
through DataLoader workers, TTA in results.json, a one-line refusal without the ImageNet
weights, and 2 processes under ZeRO-2, exactly resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cars_sample import csv_layout, devkit_layout
from conftest import ROOT, launch
from test_stages import weights
from toolkit.recipe import load_model

CARS = ROOT / "recipes" / "cars.py"
CLASSES = ["car 1", "car 2", "car 3"]
# 16 training images, batch 8: 2 steps an epoch, stage 1 = steps 1-2, stage 2 = steps 3-6.
SMALL = ["--preset", "cpu", "--size", "32", "--batch-size", "8", "--freeze-epochs", "1",
         "--epochs", "2", "--workers", "1", "--checkpoint-every", "2",
         "--keep-checkpoints", "10", "--no-progress"]
BODY_BN, HEAD = "layer2.0.bn1.running_mean", "head.2.weight"  # head.2: the first Linear


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Both layouts and a resnet50 state dict saved as torchvision saves IMAGENET1K_V1."""
    import torchvision

    root = tmp_path_factory.mktemp("cars")
    devkit_layout(root / "devkit", 16, 8, CLASSES, learnable=True)
    csv_layout(root / "csv", 16, 8, len(CLASSES), learnable=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), root / "resnet50.pth")
    return {"devkit": root / "devkit", "csv": root / "csv", "weights": root / "resnet50.pth"}


def args(files, layout: str = "devkit") -> list[str]:
    return [*SMALL, "--data-dir", str(files[layout]), "--weights", str(files["weights"]),
            "--pretrained"]


@pytest.fixture(scope="module")
def runs(files, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("runs")
    for layout in ("devkit", "csv"):
        launch(CARS, [*args(files, layout), "--output-dir", str(out / layout)], timeout=600)
    return {"devkit": out / "devkit", "csv": out / "csv"}


@pytest.mark.parametrize("layout", ["devkit", "csv"])
def test_both_layouts_train_and_write_the_run_contracts(runs, layout):
    run = runs[layout]
    results = json.loads((run / "results.json").read_text())
    assert results["step"] == 6
    for key in ("valid_accuracy", "plain_accuracy", "tta_accuracy", "tta_fixed_accuracy"):
        assert 0 <= results[key] <= 1, key
    config = json.loads((run / "config.json").read_text())
    assert config["freeze_epochs"] == 1 and config["optim"]["name"] == "adam"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows if "train_loss" in r} == {0, 1}
    final, reloaded = weights(run, 6), load_model(run).state_dict()  # model.safetensors
    assert final.keys() == reloaded.keys()
    for k in final:
        assert torch.equal(final[k], reloaded[k]), k


def test_stage_one_trains_the_head_alone_then_everything(runs, files):
    imagenet = torch.load(files["weights"], weights_only=True)
    boundary, end = weights(runs["devkit"], 2), weights(runs["devkit"], 6)
    body = [k for k in boundary if not k.startswith("head.")]
    assert sorted(body) == sorted(k for k in imagenet if not k.startswith("fc."))
    for k in body:  # weights and BatchNorm statistics as loaded
        assert torch.equal(boundary[k], imagenet[k]), k
    assert not torch.equal(boundary[BODY_BN], end[BODY_BN])  # stage 2 trains the body
    assert not torch.equal(boundary["layer1.0.conv1.weight"], end["layer1.0.conv1.weight"])
    assert not torch.equal(boundary[HEAD], end[HEAD])


def test_resume_mid_stage_two_is_exact(runs, files, tmp_path):
    resumed = tmp_path / "resumed"
    launch(CARS, [*args(files), "--output-dir", str(resumed), "--resume",
                  str(runs["devkit"] / "checkpoints" / "step_4")], timeout=600)
    a, b = weights(runs["devkit"], 6), weights(resumed, 6)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((resumed / "results.json").read_text())["tta_accuracy"] == \
        json.loads((runs["devkit"] / "results.json").read_text())["tta_accuracy"]


def test_missing_weights_are_one_line(files, tmp_path):
    proc = launch(CARS, [*SMALL, "--data-dir", str(files["devkit"]), "--pretrained",
                         "--weights", str(tmp_path / "nowhere.pth"),
                         "--output-dir", str(tmp_path / "a")], check=False)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "nowhere.pth" in line and "resnet50-0676ba61.pth" in line
    # No --weights: torchvision's cache (an empty TORCH_HOME here) is named instead.
    proc = launch(CARS, [*SMALL, "--data-dir", str(files["devkit"]), "--pretrained",
                         "--output-dir", str(tmp_path / "b")], check=False,
                  TORCH_HOME=str(tmp_path / "empty"))
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert str(tmp_path / "empty") in line and "--weights" in line
    assert not (tmp_path / "a" / "checkpoints").exists()


@pytest.mark.slow  # 60 s: CI runs it after the default run
def test_two_processes_zero2_freeze_and_resume_exactly(files, tmp_path):
    """BatchNorm statistics are per process, so 2 processes do not equal one; the frozen
    body stays as loaded and a resume mid-stage-2 is bitwise."""
    zero2 = [*args(files), "--strategy", "zero2"]
    run, resumed = tmp_path / "zero2", tmp_path / "resumed"
    proc = launch(CARS, [*zero2, "--output-dir", str(run)], launcher="torchrun", timeout=900)
    assert "DEEPSPEED (zero2)" in proc.stdout and "on 2 process(es)" in proc.stdout
    imagenet = torch.load(files["weights"], weights_only=True)
    boundary = weights(run, 2)
    for k in imagenet:
        if k in boundary:
            assert torch.equal(boundary[k], imagenet[k]), k
    launch(CARS, [*zero2, "--output-dir", str(resumed), "--resume",
                  str(run / "checkpoints" / "step_4")], launcher="torchrun", timeout=900)
    a, b = weights(run, 6), weights(resumed, 6)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (run / "results.json").is_file() and (run / "config.json").is_file()
