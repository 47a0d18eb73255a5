"""Atomic, sharded checkpoints with exact resume.

``checkpoints/step_N`` is written as ``checkpoints/.tmp-step_N`` by every rank
(``accelerator.save_state`` plus each rank's RNG and trainer state), then, after a barrier
proves all ranks finished, the main process writes the ``COMMITTED`` marker, fsyncs and
renames the folder in one step. A folder without the marker is never resumed from, so a
crash mid-save can only lose the checkpoint being written. The newest ``keep`` are kept.

What each rank writes and reads is its strategy's (:meth:`toolkit.parallel.base.Strategy.save`),
and a checkpoint resumes on another number of processes (ZeRO shards are re-cut, FSDP2's
reshard). The marker records the strategy's ``layout``: another layout's files do not fit,
and resuming under one is refused in one line. RNG states are restored by us and fail
loudly: Accelerate's ``load_state`` logs and goes on when it cannot restore them, which would
make a resumed run silently differ.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch

from toolkit import parallel
from toolkit.atomic import fsync_dir, write_atomic
from toolkit.distributed import any_failed, gather_objects
from toolkit.errors import UserError

MARKER = "COMMITTED"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Leftovers of an interrupted save (.tmp-) or prune (.del-); the next save removes them.
_LEFTOVER = re.compile(r"^(\.tmp-|\.del-)step_\d+$")


def committed(path: Path) -> bool:
    return (path / MARKER).is_file()


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Committed checkpoints under ``ckpt_dir``, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and committed(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def candidates(resume: str | None, ckpt_dir: Path) -> list[Path]:
    """Checkpoints to try in order: ``auto`` = the committed ones, newest first; a path = it."""
    if resume is None:
        return []
    if resume == "auto":
        return [p for _, p in reversed(list_checkpoints(ckpt_dir))]
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"--resume {resume}: no such checkpoint folder; pass 'auto' or a "
                        "checkpoints/step_N folder")
    if not committed(path):
        raise UserError(f"--resume {resume}: not a complete checkpoint (no {MARKER} marker: "
                        "its save was interrupted); pass 'auto' or another step_N folder")
    return [path]


def read_marker(path: Path) -> dict:
    try:
        marker = json.loads((path / MARKER).read_text())
        if not isinstance(marker, dict) or "step" not in marker:
            raise ValueError("no step recorded")
        return marker
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {path}: its {MARKER} marker is unreadable ({e}); resume "
                        "from another step_N folder") from None


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")
                  if p.is_file() and p.name != MARKER)


def crc32(file: Path, chunk: int = 1 << 24) -> str:
    """CRC-32 of a file, read in 16 MiB chunks (zlib: ~6.6 GB/s here, sha256 ~1.9 GB/s)."""
    crc = 0
    with open(file, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def checksums(path: Path, rank: int = 0, world: int = 1) -> dict[str, dict]:
    """Size and CRC-32 of this rank's share (every ``world``-th) of the files under ``path``."""
    return {name: {"bytes": (path / name).stat().st_size, "crc32": crc32(path / name)}
            for name in _files(path)[rank::world]}


def check(path: Path, rank: int = 0, world: int = 1) -> str | None:
    """The first problem of this rank's share of ``path``'s recorded files, or None.

    A checkpoint saved before files were recorded is taken as it is.
    """
    try:
        recorded = read_marker(path).get("files")
    except UserError:
        return f"its {MARKER} marker is unreadable"
    if recorded is None:
        return None
    for name in sorted(recorded)[rank::world]:
        file, want = path / name, recorded[name]
        if not file.is_file():
            return f"{file} is missing"
        size = file.stat().st_size
        if size != want["bytes"]:
            return f"{file} has {size} bytes, {want['bytes']} were saved (truncated or replaced)"
        if crc32(file) != want["crc32"]:
            return f"{file} fails its checksum (its bytes changed after the save)"
    return None


def resume_point(accelerator, resume: str | None, ckpt_dir: Path) -> Path | None:
    """The checkpoint to resume from, verified by all ranks together (collective).

    ``auto`` passes over a damaged newest checkpoint to the one before, saying which and
    why; a damaged checkpoint named by path, or no sound one at all, is a one-line error.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    tried = []
    for path in candidates(resume, ckpt_dir):
        why = next((w for w in gather_objects(check(path, rank, world)) if w), None)
        if why is None:
            if tried:
                accelerator.print(f"note: resuming from {path}, not from the newer "
                                  + "; ".join(tried))
            return path
        if resume != "auto":
            raise UserError(f"checkpoint {path} is damaged: {why}; resume from another "
                            "step_N folder")
        tried.append(f"{path.name} ({why})")
    if tried:
        raise UserError(f"no checkpoint in {ckpt_dir} is sound: " + "; ".join(tried))
    return None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def clean_leftovers(ckpt_dir: Path) -> None:
    """Remove what interrupted saves and prunes left: temp folders, folders being deleted,
    and ``step_N`` folders without their marker (never loadable)."""
    for p in ckpt_dir.iterdir():
        if _LEFTOVER.match(p.name) or (_STEP_DIR.match(p.name) and not committed(p)):
            shutil.rmtree(p, ignore_errors=True)


def remove(path: Path) -> None:
    """Delete a checkpoint so that it is never seen half-deleted: out of sight first (one
    rename), then its files."""
    gone = path.with_name(".del-" + path.name)
    os.rename(path, gone)
    fsync_dir(path.parent)
    shutil.rmtree(gone)


def _save_failed(error: BaseException, tmp: Path, ckpt_dir: Path) -> UserError:
    """The one-line reason a save failed, after ``tmp`` is gone; names space when short."""
    written = _size(tmp) if tmp.exists() else 0
    shutil.rmtree(tmp, ignore_errors=True)
    free = shutil.disk_usage(ckpt_dir).free
    last = list_checkpoints(ckpt_dir)
    full = any(getattr(e, "errno", None) == errno.ENOSPC for e in _chain(error)) or \
        "No space left" in str(error) or "unexpected pos" in str(error) or free < written
    if full:
        need = (f"about {_size(last[-1][1])} bytes (the size of {last[-1][1].name})" if last
                else f"more than {written + free} bytes")
        return UserError(f"disk full: saving a checkpoint in {ckpt_dir} needs {need}, {free} "
                         "bytes are free; the partial save was removed"
                         + (f", {last[-1][1].name} is intact" if last else "")
                         + "; free space, then resume with --resume auto")
    msg = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return UserError(f"saving a checkpoint in {ckpt_dir} failed ({type(error).__name__}: {msg});"
                     " the partial save was removed")


def _chain(e: BaseException | None):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def _collectively(accelerator, work, tmp: Path, ckpt_dir: Path, main_only: bool = False):
    """Run ``work`` (on the main process only, if asked); if it fails on any rank, every
    rank raises the same kind of one-line error (nobody is left waiting in a collective)."""
    error = None
    if accelerator.is_main_process or not main_only:
        try:
            work()
        except (OSError, RuntimeError, ValueError) as e:
            error = e
    if any_failed(error):
        if error is not None:
            raise _save_failed(error, tmp, ckpt_dir) from error
        raise UserError(f"saving a checkpoint in {ckpt_dir} failed on another rank (see its "
                        "error line)")


def save(strategy, ckpt_dir: Path, step: int, trainer_state: dict, keep: int) -> Path:
    """Save every rank's state as ``ckpt_dir/step_{step}``; collective: call on all ranks.

    Every file's size and CRC-32 go into the marker (:func:`check` verifies them on resume).
    A save that fails (a full disk) removes its temp folder and raises :class:`UserError`
    on every rank; the checkpoints already committed are untouched.
    """
    final = ckpt_dir / f"step_{step}"
    tmp = ckpt_dir / f".tmp-step_{step}"
    accelerator = strategy.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes

    def prepare():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        clean_leftovers(ckpt_dir)
        tmp.mkdir()

    def write():
        strategy.save(tmp)
        torch.save({**trainer_state, "rng": rng_state()}, tmp / f"trainer_{rank}.pt")

    _collectively(accelerator, prepare, tmp, ckpt_dir, main_only=True)
    _collectively(accelerator, write, tmp, ckpt_dir)
    accelerator.wait_for_everyone()
    files = {}
    for share in gather_objects(checksums(tmp, rank, world)):
        files.update(share)

    def commit():
        marker = {"step": step, "world_size": world, "layout": strategy.layout,
                  "files": dict(sorted(files.items()))}
        write_atomic(tmp / MARKER, json.dumps(marker))  # fsyncs the file and tmp
        if final.exists():  # from before a resume at an earlier step: this one replaces it
            remove(final)
        os.rename(tmp, final)
        fsync_dir(ckpt_dir)
        for _, old in list_checkpoints(ckpt_dir)[:-keep]:
            remove(old)

    _collectively(accelerator, commit, tmp, ckpt_dir, main_only=True)
    return final


def layout_of(marker: dict) -> str:
    """The strategy layout a marker records (older markers: only the ZeRO stage)."""
    stage = marker.get("zero_stage", 0)
    return marker.get("layout") or (f"zero{stage}" if stage else "ddp")


def load(strategy, path: Path) -> dict:
    """Restore model, optimizer, scheduler, scaler and RNG from ``path``; return trainer state."""
    marker = read_marker(path)
    accelerator = strategy.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    own = path / f"trainer_{rank}.pt"
    if layout_of(marker) != strategy.layout:
        raise UserError(f"checkpoint {path} was saved under {layout_of(marker)} and this run "
                        f"uses {strategy.name}: resume with the strategy it was saved with")
    try:
        strategy.load(path)
        state = torch.load(own if own.exists() else path / "trainer_0.pt", weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which checkpoint, no traceback
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} could not be loaded ({type(e).__name__}: {msg}); "
                        "resume from another step_N folder") from e
    if marker["world_size"] == world:
        set_rng_state(state["rng"])
    else:
        # Per-rank RNG streams cannot map onto another world size: reseed deterministically
        # from the step. Data order is unaffected (it depends on the step only).
        if accelerator.is_main_process:
            print(f"note: checkpoint saved with {marker['world_size']} processes, resumed with "
                  f"{world}: dropout RNG streams reseeded from the step")
        torch.manual_seed(state["step"] * 1000 + rank)
    return state


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """The model's full weights in a checkpoint folder, whatever strategy saved it (one
    process, no process group)."""
    layout = layout_of(read_marker(folder)) if committed(folder) else "ddp"
    found = parallel.STRATEGIES[layout].checkpoint_weights(folder)
    if found is None:
        raise UserError(f"{folder} holds no model weights of a {layout} checkpoint")
    return found
