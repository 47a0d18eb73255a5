"""Checkpoints: only committed ``step_N`` folders count, the newest K are kept, and every
refusal (a run already in the folder, a missing, incomplete or corrupt checkpoint, another
run's checkpoint) exits 2 with one line and leaves the files as they were."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import TINY, launch
from toolkit.checkpoint import MARKER, list_checkpoints, resolve_resume
from toolkit.errors import UserError

ARGS = ["--max-steps", "6", "--checkpoint-every", "2", "--keep-checkpoints", "2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished 6-step tiny run, checkpointed at steps 2, 4 and 6. Tests must not change it."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    launch(TINY, ["--output-dir", str(out), *ARGS])
    return out


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with the hash of its bytes ('dir' for folders)."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else
            hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))}


def refused(args: list[str]) -> str:
    """Run tiny.py expecting exit 2 with one ``error:`` line and no traceback; that line."""
    proc = launch(TINY, args, check=False)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_keeps_newest_committed(run):
    ckpt = run / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_4", "step_6"]  # no .tmp- leftovers
    for step in (4, 6):
        marker = json.loads((ckpt / f"step_{step}" / MARKER).read_text())
        assert marker == {"step": step, "world_size": 1, "zero_stage": 0}
    assert list_checkpoints(ckpt) == [(4, ckpt / "step_4"), (6, ckpt / "step_6")]
    assert resolve_resume("auto", ckpt) == ckpt / "step_6"
    assert json.loads((run / "results.json").read_text())["checkpoint"] == str(ckpt / "step_6")


def test_auto_ignores_incomplete_folders(run, tmp_path):
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(run / "checkpoints", ckpt)
    # A newer step without its marker, and an unrenamed temp folder (even one with a marker).
    shutil.copytree(ckpt / "step_6", ckpt / "step_99")
    (ckpt / "step_99" / MARKER).unlink()
    shutil.copytree(ckpt / "step_6", ckpt / ".tmp-step_100")
    assert [step for step, _ in list_checkpoints(ckpt)] == [4, 6]
    assert resolve_resume("auto", ckpt) == ckpt / "step_6"
    assert resolve_resume(None, ckpt) is None
    assert resolve_resume("auto", tmp_path / "no-such-dir") is None  # a fresh run starts


def test_resume_path_must_be_a_committed_checkpoint(run, tmp_path):
    ckpt = run / "checkpoints"
    assert resolve_resume(str(ckpt / "step_4"), ckpt) == ckpt / "step_4"
    with pytest.raises(UserError, match="no such checkpoint folder"):
        resolve_resume(str(tmp_path / "step_8"), ckpt)
    incomplete = tmp_path / "step_99"
    shutil.copytree(ckpt / "step_6", incomplete)
    (incomplete / MARKER).unlink()
    with pytest.raises(UserError, match=f"not a complete checkpoint \\(no {MARKER} marker"):
        resolve_resume(str(incomplete), ckpt)


def test_rerun_into_same_dir_refuses_and_changes_nothing(run):
    before = snapshot(run)
    line = refused(["--output-dir", str(run), *ARGS])
    assert "already holds a run" in line and "--resume" in line
    assert snapshot(run) == before


def test_resume_from_missing_path(tmp_path):
    out, missing = tmp_path / "run", tmp_path / "nowhere" / "step_4"
    line = refused(["--output-dir", str(out), *ARGS, "--resume", str(missing)])
    assert str(missing) in line and "no such checkpoint folder" in line
    assert not out.exists()


def test_corrupt_checkpoint_refuses_and_changes_nothing(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    weights = copy / "checkpoints" / "step_4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = snapshot(copy)
    line = refused(["--output-dir", str(copy), *ARGS,
                    "--resume", str(copy / "checkpoints" / "step_4")])
    assert "step_4 could not be loaded" in line
    assert snapshot(copy) == before


def test_resume_with_another_step_budget_refuses(run):
    before = snapshot(run)
    line = refused(["--output-dir", str(run), *ARGS[2:], "--max-steps", "8", "--resume", "auto"])
    assert "step_6" in line and "6 steps" in line and "8" in line and "--max-steps" in line
    assert snapshot(run) == before
