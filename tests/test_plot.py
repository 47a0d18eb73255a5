"""What a run leaves to look at: metrics.jsonl rows, TensorBoard events and
``toolkit plot RUN_DIR`` (metrics.png), including on the repeated steps of a resumed run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TINY, env, launch
from toolkit.experiments.plot import plot_run
from toolkit.run_folder import RunFolder

TRAIN_KEYS = {"step", "stage", "epoch", "lr", "beta1", "train_loss"}
EVAL_KEYS = {"step", "stage", "epoch", "valid_loss", "valid_accuracy", "train_seconds"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished 4-step tiny run, logged every step and evaluated every 2."""
    out = tmp_path_factory.mktemp("plot") / "run"
    launch(TINY, ["--output-dir", str(out), "--max-steps", "4", "--eval-every", "2"])
    return out


def toolkit_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "toolkit.cli", *args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=120)


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_metrics_rows(run):
    rows = rows_of(run / "metrics.jsonl")
    train = [r for r in rows if "train_loss" in r]
    evals = [r for r in rows if "valid_loss" in r]
    assert len(train) + len(evals) == len(rows)
    assert all(set(r) == TRAIN_KEYS for r in train) and all(set(r) == EVAL_KEYS for r in evals)
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["step"] for r in evals] == [2, 4]
    assert [r["epoch"] for r in evals] == [0.2, 0.4]  # 10 steps per epoch
    assert all(0 <= r["valid_accuracy"] <= 1 for r in evals)


def test_tensorboard_events_match_metrics(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(run.rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"lr", "beta1", "train_loss", "valid_loss", "valid_accuracy"} <= tags
    logged = {r["step"]: r["train_loss"] for r in rows_of(run / "metrics.jsonl")
              if "train_loss" in r}
    assert {s.step: s.value for s in acc.Scalars("train_loss")} == pytest.approx(logged, rel=1e-6)


def test_toolkit_plot_writes_png(run):
    proc = toolkit_cli("plot", str(run))
    assert proc.returncode == 0, proc.stderr
    png = run / "metrics.png"
    assert proc.stdout.strip().splitlines()[-1] == str(png)
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000


def test_read_metrics_keeps_last_row_of_a_repeated_step(run, tmp_path):
    # A run resumed from step 2 logs steps 3 and 4 (and the eval at 4) a second time.
    rows = rows_of(run / "metrics.jsonl")
    again = [{**r, **({"train_loss": 100 + r["step"]} if "train_loss" in r else
                      {"valid_loss": 200.0})} for r in rows if r["step"] > 2]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + again))
    kept = RunFolder(resumed).read_metrics()
    train = [r for r in kept if "train_loss" in r]
    evals = [r for r in kept if "valid_loss" in r]
    first_train = [r for r in rows if "train_loss" in r]
    first_evals = [r for r in rows if "valid_loss" in r]
    assert train == first_train[:2] + [{**first_train[2], "train_loss": 103},
                                       {**first_train[3], "train_loss": 104}]
    assert evals == [first_evals[0], {**first_evals[1], "valid_loss": 200.0}]
    assert len(kept) == 6 and [r["step"] for r in kept] == sorted(r["step"] for r in kept)
    assert plot_run(resumed).read_bytes()[:8] == PNG_MAGIC


def test_toolkit_plot_of_missing_dir_exits_2(tmp_path):
    proc = toolkit_cli("plot", str(tmp_path / "nowhere"))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nowhere" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
