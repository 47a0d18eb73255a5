"""``toolkit wd-find`` on digits: the LR range test once, then short 1cycle runs over a log
grid of weight decays for L2 (Adam) and decoupled decay (AdamW) at its lr; the best of each
from the runs' own results, their ratio and the plot."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, env

WDS = ["1e-05", "0.001", "0.1", "1"]


@pytest.fixture(scope="module")
def found(tmp_path_factory):
    out = tmp_path_factory.mktemp("wd") / "find"
    proc = subprocess.run([sys.executable, "-m", "toolkit.cli", "wd-find", "recipes/digits.py",
                           "--out", str(out), "--wds", *WDS, "--", "--epochs", "3"], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


@pytest.mark.slow  # their shared runs take 65 s: CI runs it after the default run
def test_the_best_of_each_kind_comes_from_the_runs(found):
    out, stdout = found
    summary = json.loads((out / "wd_find.json").read_text())
    lr = json.loads((out / "lr_find" / "lr_find.json").read_text())["suggestions"]["valley"]
    assert summary["lr"] == lr and summary["metric"] == "valid_accuracy"
    for kind, optim in (("l2", "adam"), ("decoupled", "adamw")):
        seen = {}
        for wd in WDS:
            cell = out / f"{kind}-wd{wd}-seed0"
            config = json.loads((cell / "config.json").read_text())
            assert config["optim"]["name"] == optim and config["optim"]["lr"] == lr
            assert config["optim"]["wd"] == float(wd)
            seen[wd] = json.loads((cell / "results.json").read_text())["valid_accuracy"]
        assert summary["table"][kind] == seen
        best = max(WDS, key=lambda w: seen[w])
        assert summary["best_wd"][kind] == float(best) and summary["best"][kind] == seen[best]
    ratio = summary["best_wd"]["decoupled"] / summary["best_wd"]["l2"]
    assert summary["ratio_decoupled_to_l2"] == pytest.approx(ratio)
    assert f"best wd: L2 {summary['best_wd']['l2']:g}" in stdout


@pytest.mark.slow  # their shared runs take 65 s: CI runs it after the default run
def test_the_plot_is_drawn(found):
    out, _ = found
    image = np.asarray(Image.open(out / "wd_find.png").convert("RGB"))
    assert image.shape[0] >= 300 and image.shape[1] >= 400
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 10  # lines, not a blank canvas


@pytest.mark.slow  # their shared runs take 65 s: CI runs it after the default run
def test_run_again_it_reuses_the_lr_and_the_cells(found):
    out, _ = found
    before = (out / "wd_find.json").read_text()
    proc = subprocess.run([sys.executable, "-m", "toolkit.cli", "wd-find", "recipes/digits.py",
                           "--out", str(out), "--wds", *WDS, "--", "--epochs", "3"], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.count("finished, skipped") == 2 * len(WDS)
    assert (out / "wd_find.json").read_text() == before


def test_bad_values_are_one_line(tmp_path):
    for args in (["--wds", "-1"], ["--lr", "0"]):
        proc = subprocess.run([sys.executable, "-m", "toolkit.cli", "wd-find",
                               "recipes/digits.py", "--out", str(tmp_path), *args], cwd=ROOT,
                              env=env(), capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
