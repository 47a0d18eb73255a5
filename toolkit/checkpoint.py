"""Atomic, sharded checkpoints with exact resume.

``checkpoints/step_N`` is written as ``checkpoints/.tmp-step_N`` by every rank
(``accelerator.save_state`` plus each rank's RNG and trainer state), then, after a barrier
proves all ranks finished, the main process writes the ``COMMITTED`` marker, fsyncs and
renames the folder in one step. A folder without the marker is never resumed from, so a
crash mid-save can only lose the checkpoint being written. The newest ``keep`` are kept.

RNG states are restored by us and fail loudly: Accelerate's ``load_state`` logs and goes on
when it cannot restore them, which would make a resumed run silently differ.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from toolkit.errors import UserError

MARKER = "COMMITTED"
_STEP_DIR = re.compile(r"^step_(\d+)$")


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


def resolve_resume(resume: str | None, ckpt_dir: Path) -> Path | None:
    """The checkpoint to resume from: ``auto`` = newest committed one (or none), or a path."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(ckpt_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"--resume {resume}: no such checkpoint folder; pass 'auto' or a "
                        "checkpoints/step_N folder")
    if not committed(path):
        raise UserError(f"--resume {resume}: not a complete checkpoint (no {MARKER} marker: "
                        "its save was interrupted); pass 'auto' or another step_N folder")
    return path


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


def zero_stage(accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.zero_stage) if plugin is not None else 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(accelerator, ckpt_dir: Path, step: int, trainer_state: dict, keep: int) -> Path:
    """Save every rank's state as ``ckpt_dir/step_{step}``; collective: call on all ranks."""
    final = ckpt_dir / f"step_{step}"
    if committed(final):  # already saved at this step (periodic then final save)
        return final
    tmp = ckpt_dir / f".tmp-step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crashed save
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    rank = accelerator.process_index
    torch.save({**trainer_state, "rng": rng_state()}, tmp / f"trainer_{rank}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker = {"step": step, "world_size": accelerator.num_processes,
                  "zero_stage": zero_stage(accelerator)}
        with open(tmp / MARKER, "w") as f:
            json.dump(marker, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(ckpt_dir)
        for _, old in list_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, path: Path) -> dict:
    """Restore model, optimizer, scheduler, scaler and RNG from ``path``; return trainer state."""
    marker = json.loads((path / MARKER).read_text())
    rank, world = accelerator.process_index, accelerator.num_processes
    own = path / f"trainer_{rank}.pt"
    if marker["world_size"] != world and (marker.get("zero_stage", 0) or zero_stage(accelerator)):
        # DeepSpeed 0.19.8's engine refuses to re-cut ZeRO optimizer shards for a new world.
        raise UserError(f"checkpoint {path} was saved by {marker['world_size']} processes and "
                        f"this run has {world}: ZeRO checkpoints resume only on the same number "
                        "of processes (DDP and single-process checkpoints resume on any)")
    try:
        accelerator.load_state(str(path))
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
