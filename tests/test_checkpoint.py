"""Checkpoints: only committed ``step_N`` folders count, the newest K are kept, every file's
size and checksum is verified on resume, and every refusal (a run already in the folder, a
missing, incomplete or corrupt checkpoint, another run's checkpoint) exits 2 with one line
naming what is wrong and leaves the files as they were."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import TINY, launch
from toolkit import checkpoint
from toolkit.checkpoint import MARKER, candidates, check, list_checkpoints
from toolkit.errors import UserError

ARGS = ["--max-steps", "6", "--checkpoint-every", "2", "--keep-checkpoints", "2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished 6-step tiny run, checkpointed at steps 2, 4 and 6. Tests must not change it."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    launch(TINY, ["--output-dir", str(out), *ARGS])
    return out


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with the hash of its bytes ('dir' for folders); the lock
    file is left out (it names the last process that held the folder)."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else
            hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.name != ".lock"}


def newest(candidates_: list[Path]) -> Path | None:
    return candidates_[0] if candidates_ else None


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
        folder = ckpt / f"step_{step}"
        marker = json.loads((folder / MARKER).read_text())
        files = marker.pop("files")
        assert marker == {"step": step, "world_size": 1, "layout": "ddp"}
        assert {"model.safetensors", "optimizer.bin", "trainer_0.pt"} <= set(files)
        for name, rec in files.items():
            assert rec["bytes"] == (folder / name).stat().st_size
            assert rec["crc32"] == checkpoint.crc32(folder / name)
        assert check(folder) is None
    assert list_checkpoints(ckpt) == [(4, ckpt / "step_4"), (6, ckpt / "step_6")]
    assert candidates("auto", ckpt) == [ckpt / "step_6", ckpt / "step_4"]
    assert json.loads((run / "results.json").read_text())["checkpoint"] == str(ckpt / "step_6")


def test_auto_ignores_incomplete_folders(run, tmp_path):
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(run / "checkpoints", ckpt)
    # A newer step without its marker, and an unrenamed temp folder (even one with a marker).
    shutil.copytree(ckpt / "step_6", ckpt / "step_99")
    (ckpt / "step_99" / MARKER).unlink()
    shutil.copytree(ckpt / "step_6", ckpt / ".tmp-step_100")
    assert [step for step, _ in list_checkpoints(ckpt)] == [4, 6]
    assert newest(candidates("auto", ckpt)) == ckpt / "step_6"
    assert candidates(None, ckpt) == []
    assert candidates("auto", tmp_path / "no-such-dir") == []  # a fresh run starts
    checkpoint.clean_leftovers(ckpt)  # what the next save does first
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_4", "step_6"]


def test_resume_path_must_be_a_committed_checkpoint(run, tmp_path):
    ckpt = run / "checkpoints"
    assert candidates(str(ckpt / "step_4"), ckpt) == [ckpt / "step_4"]
    with pytest.raises(UserError, match="no such checkpoint folder"):
        candidates(str(tmp_path / "step_8"), ckpt)
    incomplete = tmp_path / "step_99"
    shutil.copytree(ckpt / "step_6", incomplete)
    (incomplete / MARKER).unlink()
    with pytest.raises(UserError, match=f"not a complete checkpoint \\(no {MARKER} marker"):
        candidates(str(incomplete), ckpt)


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


def flip_byte(file: Path, at: int) -> None:
    data = bytearray(file.read_bytes())
    data[at] ^= 0x01
    file.write_bytes(bytes(data))


# Each way a checkpoint file goes bad, and the words that must name it.
DAMAGE = {
    "truncated": (lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]), "bytes"),
    "random": (lambda f: f.write_bytes(os.urandom(f.stat().st_size)), "checksum"),
    # One bit inside the tensor data (past the safetensors header): loads without an error.
    "flipped": (lambda f: flip_byte(f, f.stat().st_size - 7), "checksum"),
    "missing": (lambda f: f.unlink(), "missing"),
    "empty": (lambda f: f.write_bytes(b""), "bytes"),
}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.bin", "trainer_0.pt"])
def test_check_names_the_damaged_file(run, tmp_path, damage, name):
    folder = tmp_path / "step_6"
    shutil.copytree(run / "checkpoints" / "step_6", folder)
    assert check(folder) is None
    hurt, words = DAMAGE[damage]
    hurt(folder / name)
    problem = check(folder)
    assert problem is not None and str(folder / name) in problem and words in problem
    # Shared out over 3 ranks, exactly one rank finds it.
    assert sum(check(folder, rank, 3) is not None for rank in range(3)) == 1


@pytest.mark.parametrize("content", [b"", b"{not json", b"[]"])
def test_unreadable_marker_is_a_problem_not_a_traceback(run, tmp_path, content):
    folder = tmp_path / "step_6"
    shutil.copytree(run / "checkpoints" / "step_6", folder)
    (folder / MARKER).write_bytes(content)
    assert "marker is unreadable" in check(folder)
    with pytest.raises(UserError, match=f"{MARKER} marker is unreadable"):
        checkpoint.read_marker(folder)


def test_damaged_checkpoint_by_path_refuses_and_changes_nothing(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    flip_byte(copy / "checkpoints" / "step_4" / "model.safetensors", -7)
    before = snapshot(copy)
    line = refused(["--output-dir", str(copy), *ARGS,
                    "--resume", str(copy / "checkpoints" / "step_4")])
    assert str(copy / "checkpoints" / "step_4" / "model.safetensors") in line
    assert "checksum" in line
    assert snapshot(copy) == before


def test_auto_passes_over_a_damaged_newest_and_says_why(run, tmp_path):
    """Newest with an empty marker, then with a flipped byte: --resume auto takes step_4 and
    names what it passed over; once nothing is sound it refuses in one line."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ckpt = copy / "checkpoints"
    (ckpt / "step_6" / MARKER).write_text("")
    proc = launch(TINY, ["--output-dir", str(copy), *ARGS, "--resume", "auto"])
    assert f"resumed from {ckpt / 'step_4'}" in proc.stdout
    assert "not from the newer step_6 (its COMMITTED marker is unreadable)" in proc.stdout
    # The run went on from step 4 and replaced the damaged step_6 with a sound one.
    assert check(ckpt / "step_6") is None and json.loads((ckpt / "step_6" / MARKER).read_text())
    for step in (4, 6):
        flip_byte(ckpt / f"step_{step}" / "optimizer.bin", -3)
    before = snapshot(copy)
    line = refused(["--output-dir", str(copy), *ARGS, "--resume", "auto"])
    assert "no checkpoint" in line and "is sound" in line
    assert str(ckpt / "step_6" / "optimizer.bin") in line and "step_4" in line
    assert snapshot(copy) == before


def test_resume_over_a_newest_without_marker(run, tmp_path):
    """A step_6 without its marker: resume from step_4, and the save at step 6 replaces the
    leftover (it crashed on rename: Directory not empty)."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ckpt = copy / "checkpoints"
    (ckpt / "step_6" / MARKER).unlink()
    (ckpt / ".tmp-step_8").mkdir()  # and leftovers of a crashed save and prune
    (ckpt / ".del-step_2").mkdir()
    proc = launch(TINY, ["--output-dir", str(copy), *ARGS, "--resume", "auto"])
    assert f"resumed from {ckpt / 'step_4'}" in proc.stdout
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_4", "step_6"]
    assert check(ckpt / "step_6") is None


def test_prune_interrupted_leaves_no_visible_half_checkpoint(run, tmp_path, monkeypatch):
    """A prune killed part-way (rmtree deletes in directory order, the marker possibly last)
    leaves nothing that --resume auto would take."""
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(run / "checkpoints", ckpt)

    def killed_rmtree(path, *args, **kwargs):
        files = sorted(Path(path).iterdir(), key=lambda p: p.name == MARKER)
        files[0].unlink()  # one file gone, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.remove(ckpt / "step_4")
    monkeypatch.undo()
    assert list_checkpoints(ckpt) == [(6, ckpt / "step_6")]
    checkpoint.clean_leftovers(ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_6"]


def test_resume_with_another_step_budget_refuses(run):
    before = snapshot(run)
    line = refused(["--output-dir", str(run), *ARGS[2:], "--max-steps", "8", "--resume", "auto"])
    assert "step_6" in line and "6 steps" in line and "8" in line and "--max-steps" in line
    assert snapshot(run) == before
