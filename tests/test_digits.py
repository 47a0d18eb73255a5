"""The main job, as the README runs it: digits to >= 96% test accuracy on CPU, and the
same recipe under ``accelerate launch`` with the 2-process CPU config."""

from __future__ import annotations

import json

from conftest import DIGITS, launch


def test_digits_reaches_96_percent(tmp_path):
    proc = launch(DIGITS, ["--output-dir", str(tmp_path / "run"), "--no-progress"], timeout=600)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["valid_accuracy"] >= 0.96, results
    assert f"test accuracy {results['valid_accuracy']:.4f}" in proc.stdout
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["optim"]["name"] == "adamw" and config["train"]["epochs"] == 15


def test_digits_under_accelerate_launch_with_two_processes(tmp_path):
    proc = launch(DIGITS, ["--output-dir", str(tmp_path / "run"), "--max-steps", "12",
                           "--optim.amsgrad", "--no-progress"], launcher="accelerate")
    assert "on 2 process(es), MULTI_CPU" in proc.stdout
    assert "test accuracy" in proc.stdout
