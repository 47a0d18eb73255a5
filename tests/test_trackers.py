"""``--trackers``: a digits run logged to MLflow (a local file store), W&B (offline) and CSV
reads back through each library's own API with the rows of ``metrics.jsonl``; a resumed run
continues the same MLflow and W&B runs; a tracker that cannot start is one line before the
first step, and the folder is left as it was."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from unittest import mock

import pytest

import wandb_offline
from conftest import DIGITS, launch
from toolkit.run_folder import RunFolder

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("wandb")

ARGS = ["--max-steps", "20", "--eval-every", "10", "--log-every", "5", "--checkpoint-every",
        "10", "--no-progress", "--trackers", "mlflow", "wandb", "csv", "--tracker-project",
        "trackers-test"]


def tracker_env(tmp: Path) -> dict:
    return {"MLFLOW_TRACKING_URI": (tmp / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true",
            "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp)}


def rows(run: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in RunFolder(run).read_metrics() if key in r}


def client(tmp: Path):
    with mock.patch.dict(os.environ, {"MLFLOW_ALLOW_FILE_STORE": "true"}):
        return mlflow.tracking.MlflowClient((tmp / "mlruns").as_uri())


def mlflow_history(tmp: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client(tmp).get_metric_history(run_id, key))


def wandb_files(run: Path) -> list[Path]:
    return sorted(run.glob("wandb/offline-run-*/run-*.wandb"))


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("trackers")
    launch(DIGITS, ["--output-dir", str(tmp / "run"), *ARGS], **tracker_env(tmp))
    return tmp, tmp / "run"


def test_each_tracker_reads_back_the_rows_of_metrics_jsonl(tracked):
    tmp, run = tracked
    ids = json.loads((run / "trackers.json").read_text())
    losses, valid = rows(run, "train_loss"), rows(run, "valid_loss")
    assert sorted(losses) == [5, 10, 15, 20] and sorted(valid) == [10, 20]

    # MLflow, through its client: every scalar row, the config as params, provenance as tags
    for key, want in (("train_loss", losses), ("valid_loss", valid), ("lr", rows(run, "lr"))):
        got = mlflow_history(tmp, ids["mlflow"], key)
        assert [s for s, _ in got] == sorted(want), key
        for step, value in got:
            assert value == pytest.approx(want[step], rel=1e-12, abs=0), (key, step)
    mlrun = client(tmp).get_run(ids["mlflow"])
    config = json.loads((run / "config.json").read_text())
    assert float(mlrun.data.params["optim.lr"]) == config["optim"]["lr"]
    assert mlrun.data.params["train.batch_size"] == str(config["train"]["batch_size"])
    assert "digits.py" in mlrun.data.tags["command"] and mlrun.data.tags["git_commit"]
    assert mlrun.info.run_name == "run" and mlrun.info.status == "FINISHED"

    # W&B, from its offline transaction log with W&B's own protobuf records
    [file] = wandb_files(run)
    record = wandb_offline.run_record(file)
    assert record.run_id == ids["wandb"] and record.project == "trackers-test"
    history = wandb_offline.history(file)
    assert {h["_step"]: h["train_loss"] for h in history if "train_loss" in h} == losses
    assert {h["_step"]: h["valid_loss"] for h in history if "valid_loss" in h} == valid

    # CSV: step,name,value
    with open(run / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert {int(r["step"]): float(r["value"]) for r in table if r["name"] == "train_loss"} \
        == losses
    assert not (run / "tensorboard").exists()  # only the trackers asked for


def test_a_resumed_run_continues_the_same_mlflow_and_wandb_runs(tracked, tmp_path):
    tmp, run = tracked
    ids = json.loads((run / "trackers.json").read_text())
    before = mlflow_history(tmp, ids["mlflow"], "train_loss")
    resumed = tmp_path / "resumed"
    launch(DIGITS, ["--output-dir", str(resumed), *ARGS, "--resume",
                    str(run / "checkpoints" / "step_10")], **tracker_env(tmp))
    assert json.loads((resumed / "trackers.json").read_text()) == ids
    # The same MLflow run: steps 15 and 20 logged again, with the same values (exact resume).
    after = mlflow_history(tmp, ids["mlflow"], "train_loss")
    assert sorted(after) == sorted(before + [p for p in before if p[0] > 10])
    store = client(tmp)
    assert len(store.search_runs([store.get_run(ids["mlflow"]).info.experiment_id])) == 1
    # W&B: the resumed process writes its own offline file, under the same run id.
    [file] = wandb_files(resumed)
    assert wandb_offline.run_record(file).run_id == ids["wandb"]
    history = {h["_step"]: h["train_loss"] for h in wandb_offline.history(file)
               if "train_loss" in h}
    assert history == {s: v for s, v in rows(run, "train_loss").items() if s > 10}


def test_a_tracker_that_cannot_start_is_one_line_before_the_first_step(tmp_path):
    run = tmp_path / "run"
    unreachable = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
                   "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    proc = launch(DIGITS, ["--output-dir", str(run), "--trackers", "mlflow", "--no-progress"],
                  check=False, **unreachable)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--trackers mlflow could not start" in proc.stderr, proc.stderr
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


def test_a_tracker_whose_package_is_missing_is_one_line(tmp_path):
    shadow = tmp_path / "shadow" / "wandb"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no wandb here')\n")
    run = tmp_path / "run"
    proc = launch(DIGITS, ["--output-dir", str(run), "--trackers", "wandb"], check=False,
                  PYTHONPATH=f"{shadow.parent}:{Path(__file__).resolve().parents[1]}")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--trackers wandb: wandb does not import (no wandb here); pip install wandb" \
        in proc.stderr, proc.stderr
    assert not run.exists()


@pytest.mark.slow  # ~20 s: CI runs it after the default run
def test_two_processes_track_once(tmp_path):
    run = tmp_path / "run"
    launch(DIGITS, ["--output-dir", str(run), *ARGS[:-6], "--trackers", "mlflow", "csv",
                    "--tracker-project", "two"], launcher="torchrun", **tracker_env(tmp_path))
    ids = json.loads((run / "trackers.json").read_text())
    store = client(tmp_path)
    experiment = store.get_experiment_by_name("two").experiment_id
    assert [r.info.run_id for r in store.search_runs([experiment])] == [ids["mlflow"]]
    losses = rows(run, "train_loss")
    assert dict(mlflow_history(tmp_path, ids["mlflow"], "train_loss")) == pytest.approx(losses)
    with open(run / "metrics.csv") as f:
        got = [(int(r["step"]), float(r["value"])) for r in csv.DictReader(f)
               if r["name"] == "train_loss"]
    assert got == sorted(losses.items())  # each row once: only the main process writes
