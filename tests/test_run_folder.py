"""The run folder's files: what is written reads back, a torn last metrics row is cut (on
disk) or skipped (on reading), and a folder's status is what sweep, report and the
trainer's reuse check all go by."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from toolkit.checkpoint import MARKER
from toolkit.errors import UserError
from toolkit.run_folder import FINISHED, INTERRUPTED, NEW, RunFolder

ROWS = [{"step": 1, "train_loss": 2.5}, {"step": 2, "train_loss": 2.0},
        {"step": 2, "valid_loss": 2.1}]


@pytest.fixture
def folder(tmp_path: Path) -> RunFolder:
    (tmp_path / "run").mkdir()
    return RunFolder(tmp_path / "run")


def test_what_is_written_reads_back(folder):
    assert folder.read_config() is folder.read_results() is folder.read_lr_find() is None
    assert folder.read_provenance() == [] and folder.read_metrics() == []
    folder.write_config({"optim": {"name": "adamw", "wd": 0.01}})
    folder.write_results({"valid_accuracy": 0.9, "step": 2})
    folder.write_lr_find({"suggestions": {"valley": 1e-3}})
    folder.write_model_spec({"builder": "recipes.digits:convnet", "args": {"width": 8}})
    folder.write_provenance([{"start": 0}, {"start": 1}])
    for row in ROWS:
        folder.append_metrics(row)
    assert folder.read_config() == {"optim": {"name": "adamw", "wd": 0.01}}
    assert folder.read_results() == {"valid_accuracy": 0.9, "step": 2}
    assert folder.read_lr_find() == {"suggestions": {"valley": 1e-3}}
    assert folder.read_model_spec()["args"] == {"width": 8}
    assert folder.read_provenance() == [{"start": 0}, {"start": 1}]
    assert folder.read_metrics() == ROWS
    # The names other tools and users look for, and nothing else left behind (no temp file).
    assert sorted(p.name for p in folder.path.iterdir()) == [
        "config.json", "lr_find.json", "metrics.jsonl", "model.json", "provenance.json",
        "results.json"]
    assert RunFolder(str(folder.path)) == folder  # a command line's str is a path too


def test_weights_read_back(folder):
    import torch

    state = {"w": torch.arange(6.0).reshape(2, 3).t(), "n": torch.tensor(3)}  # not contiguous
    folder.write_weights(state)
    back = folder.read_weights()
    assert folder.weights.name == "model.safetensors" and back.keys() == state.keys()
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_a_torn_last_row_is_skipped_on_reading_and_cut_by_repair(folder):
    for row in ROWS:
        folder.append_metrics(row)
    whole = folder.metrics.read_bytes()
    with open(folder.metrics, "a") as f:
        f.write('{"step": 3, "train_lo')  # the crash came mid-write
    assert folder.read_metrics() == ROWS
    folder.repair_metrics()
    assert folder.metrics.read_bytes() == whole
    folder.repair_metrics()  # a whole file is left as it is
    assert folder.metrics.read_bytes() == whole
    folder.append_metrics({"step": 3, "train_loss": 1.5})  # the resumed run logs it again
    assert folder.read_metrics()[-1] == {"step": 3, "train_loss": 1.5}


def test_a_row_logged_again_by_a_resume_keeps_the_last(folder):
    for row in [*ROWS, {"step": 2, "train_loss": 1.9}]:
        folder.append_metrics(row)
    assert folder.read_metrics() == [ROWS[0], {"step": 2, "train_loss": 1.9}, ROWS[2]]


def test_a_broken_whole_row_is_one_line_error(folder):
    folder.metrics.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(UserError, match="line 2 is not JSON"):
        folder.read_metrics()
    folder.results.write_text("{")
    with pytest.raises(UserError, match="results.json is not valid JSON"):
        folder.read_results()


def commit_checkpoint(folder: RunFolder, step: int, committed: bool = True) -> None:
    path = folder.checkpoints / (f"step_{step}" if committed else f".tmp-step_{step}")
    path.mkdir(parents=True)
    if committed:
        (path / MARKER).write_text(json.dumps({"step": step}))


def test_status_of_each_kind(folder, tmp_path):
    assert RunFolder(tmp_path / "nowhere").status() == NEW
    assert folder.status() == NEW and not folder.holds_run()
    folder.write_config({"seed": 0})  # a run that failed before its first row: start anew
    commit_checkpoint(folder, 2, committed=False)  # and a save that never finished
    assert folder.status() == NEW and not folder.holds_run()
    assert folder.checkpoint_steps() == []
    folder.append_metrics(ROWS[0])
    assert folder.status() == INTERRUPTED and folder.holds_run()
    folder.metrics.unlink()
    commit_checkpoint(folder, 4)  # stopped before its first logged row, after a checkpoint
    assert folder.status() == INTERRUPTED and folder.checkpoint_steps() == [4]
    folder.write_results({"step": 4})
    assert folder.status() == FINISHED and folder.holds_run()


def test_status_of_runs_the_report_reads(tmp_path):
    from report_runs import write_run

    from toolkit.experiments import report

    write_run(tmp_path / "runs" / "done")
    write_run(tmp_path / "runs" / "half", finished=False)
    runs = {r.name: r for r in report.load_runs([tmp_path / "runs"])}
    assert {k: r.status for k, r in runs.items()} == {"done": FINISHED, "half": INTERRUPTED}


# The same word for another thing: torch.hub's folder of downloaded weights.
NOT_A_RUN_FOLDER = {("toolkit/models/resnet.py", "checkpoints")}


def test_no_module_names_a_run_folder_file_but_run_folder():
    # One place per name: a literal elsewhere is a second spelling that can drift.
    names = {v for k, v in vars(RunFolder).items() if k.isupper() and isinstance(v, str)}
    assert {"config.json", "metrics.jsonl", "results.json", "checkpoints", "model.safetensors",
            "lr_find.json", ".lock", "provenance.json", "eval.json"} <= names
    root = Path(__file__).resolve().parents[1]
    found = set()
    for path in sorted([*root.glob("toolkit/**/*.py"), *root.glob("recipes/*.py")]):
        name = path.relative_to(root).as_posix()
        if name == "toolkit/run_folder.py":
            continue
        # Every string literal, f-strings' pieces included (f"code-{start}.diff").
        literals = {node.value for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.Constant) and isinstance(node.value, str)}
        found |= {(name, s) for s in literals if s in names or s.startswith("code-")}
    assert found == NOT_A_RUN_FOLDER
