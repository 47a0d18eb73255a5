"""Time to target (``--target``, ``--stop-at-target``): the first evaluation that reaches it,
as metrics.jsonl logged it, also after a resume; training seconds summed over segments; the
report's time-to-target table; bad input in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY, launch
from toolkit.target import Clock, Target, higher_is_better
from toolkit.errors import UserError

ARGS = ["--eval-every", "2", "--target", "valid_accuracy=0.55"]


def evals(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "valid_accuracy" in r]


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """A run to its end with a target it reaches midway, a checkpoint every step."""
    run = tmp_path_factory.mktemp("target") / "whole"
    launch(TINY, ["--output-dir", str(run), *ARGS, "--checkpoint-every", "1",
                  "--keep-checkpoints", "30"])
    return run


def test_the_first_evaluation_that_reaches_it(whole):
    first = next(r for r in evals(whole) if r["valid_accuracy"] >= 0.55)
    t = results(whole)["target"]
    assert t["reached"] and (t["step"], t["epoch"]) == (first["step"], first["epoch"])
    assert 2 < t["step"] < 20  # midway: earlier evaluations were below it
    assert t["valid_accuracy"] == first["valid_accuracy"]
    assert 0 < t["train_seconds"] <= results(whole)["train_seconds"]


def test_stop_at_target_ends_the_run_at_that_evaluation(whole, tmp_path):
    run = tmp_path / "stop"
    launch(TINY, ["--output-dir", str(run), *ARGS, "--stop-at-target"])
    t, r = results(run)["target"], results(run)
    assert r["step"] == t["step"] == results(whole)["target"]["step"] == evals(run)[-1]["step"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(row["step"] for row in rows) == t["step"]  # nothing trained after it
    assert (run / "checkpoints" / f"step_{t['step']}").is_dir()


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_resumed_run_reports_the_same_step_and_sums_its_seconds(whole, when, tmp_path):
    hit = results(whole)["target"]["step"]
    step = hit - 3 if when == "before" else hit + 3
    ckpt = whole / "checkpoints" / f"step_{step}"
    saved = torch.load(ckpt / "trainer_0.pt", weights_only=False)["clock"]["seconds"]
    run = tmp_path / when
    launch(TINY, ["--output-dir", str(run), *ARGS, "--resume", str(ckpt)])
    t = results(run)["target"]
    assert t["step"] == hit and t["epoch"] == results(whole)["target"]["epoch"]
    assert saved > 0 and results(run)["train_seconds"] > saved
    if when == "after":  # reached before the checkpoint: its seconds are the first run's
        assert t["train_seconds"] == results(whole)["target"]["train_seconds"]


def test_a_resume_with_another_target_looks_for_its_own(whole, tmp_path):
    hit = results(whole)["target"]["step"]
    run = tmp_path / "other"
    launch(TINY, ["--output-dir", str(run), "--eval-every", "2", "--target",
                  "valid_accuracy=0.62", "--resume",
                  str(whole / "checkpoints" / f"step_{hit + 1}")])
    t = results(run)["target"]
    first = next(r for r in evals(whole) if r["valid_accuracy"] >= 0.62)
    assert t["value"] == 0.62 and t["step"] == first["step"] > hit


def test_a_target_never_reached_says_so(tmp_path):
    run = tmp_path / "never"
    launch(TINY, ["--output-dir", str(run), "--target", "valid_loss=0.01", "--stop-at-target"])
    assert results(run)["target"] == {"metric": "valid_loss", "value": 0.01, "reached": False}
    assert results(run)["step"] == 20


def test_the_report_has_a_time_to_target_table(whole, tmp_path):
    from toolkit.experiments import report

    out = report.report(report.load_runs([whole]), tmp_path / "report")
    text = out.read_text()
    assert "Time to target" in text and "valid_accuracy >= 0.55" in text and "1 of 1" in text
    t = results(whole)["target"]
    assert f"{t['epoch']:.4g} (n=1)" in text


def test_the_report_finds_a_target_chosen_afterwards_in_the_logged_evaluations(whole, tmp_path):
    """``toolkit report --target``: the evaluation --target recorded online, found again in
    metrics.jsonl (whose evaluation rows carry the training seconds), and any other value."""
    from test_report import tables
    from toolkit.experiments import report

    def row(target: str) -> dict:
        out = tmp_path / target
        report.main([str(whole), "--out", str(out), "--target", target])
        return tables((out / "report.md").read_text())["All runs / Time to target"][0]

    online = results(whole)["target"]
    same = row("valid_accuracy=0.55")
    assert same["reached"] == "1 of 1" and same["target"] == "valid_accuracy >= 0.55"
    assert same["epochs to target"] == f"{online['epoch']:.4g} (n=1)"
    assert float(same["seconds to target"].split()[0]) == pytest.approx(
        online["train_seconds"], abs=0.05)
    later = next(r for r in evals(whole) if r["valid_accuracy"] >= 0.62)
    assert row("valid_accuracy=0.62")["epochs to target"] == f"{later['epoch']:.4g} (n=1)"
    assert row("valid_loss=0.01")["reached"] == "0 of 1"
    seconds = [r["train_seconds"] for r in evals(whole)]
    assert seconds == sorted(seconds) and seconds[-1] <= results(whole)["train_seconds"]
    with pytest.raises(UserError, match="--target='accuracy=2' must be METRIC=VALUE"):
        report.main([str(whole), "--out", str(tmp_path / "bad"), "--target", "accuracy=2"])


def test_directions_and_bad_input():
    assert higher_is_better("valid_accuracy") and not higher_is_better("valid_ppl")
    assert Target.parse("valid_ppl=70").reached({"valid_ppl": 69.9})
    assert not Target.parse("valid_ppl=70").reached({"valid_ppl": 70.1})
    assert Target.parse("valid_accuracy=0.94").reached({"valid_accuracy": 0.94})
    for bad in ("valid_accuracy", "accuracy=0.9", "valid_ppl=nan", "valid_ppl=abc"):
        with pytest.raises(ValueError, match="METRIC=VALUE"):
            Target.parse(bad)
    with pytest.raises(UserError, match="it reports valid_loss"):
        Target.parse("valid_ppl=70").reached({"valid_loss": 1.0})
    clock = Clock(Target.parse("valid_loss=1.0"), stop=True)
    clock.start()
    assert not clock.check({"valid_loss": 1.5}, 2, 0.2) and not clock.stopped
    assert clock.check({"valid_loss": 0.9}, 4, 0.4) and clock.stopped
    assert not clock.check({"valid_loss": 0.5}, 6, 0.6)  # the first one counts
    assert clock.result()["target"]["step"] == 4


@pytest.mark.parametrize("args, says", [
    (["--stop-at-target"], "--stop-at-target needs --target"),
    (["--target", "valid_accuracy"], "METRIC=VALUE"),
    (["--target", "valid_f1=0.9"], "it reports valid_accuracy, valid_loss"),
])
def test_bad_targets_are_one_line_and_exit_2(args, says, tmp_path):
    proc = launch(TINY, ["--output-dir", str(tmp_path / "bad"), *args], check=False)
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr.strip().splitlines()[-1]
