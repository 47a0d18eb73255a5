"""Atomic, sharded checkpoints with exact resume.

``checkpoints/step_N`` is written as ``checkpoints/.tmp-step_N`` by every rank
(``accelerator.save_state`` plus each rank's RNG and trainer state), then, after a barrier
proves all ranks finished, the main process writes the ``COMMITTED`` marker, fsyncs and
renames the folder in one step. A folder without the marker is never resumed from, so a
crash mid-save can only lose the checkpoint being written. The newest ``keep`` are kept.

A checkpoint resumes on another number of processes; DeepSpeed ZeRO shards are re-cut for
it (:func:`any_world`). RNG states are restored by us and fail loudly: Accelerate's
``load_state`` logs and goes on when it cannot restore them, which would make a resumed run
silently differ.
"""

from __future__ import annotations

import functools
import errno
import glob
import itertools
import json
import os
import random
import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch

from toolkit.distributed import all_reduce_sum, gather_objects
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


def zero_stage(accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.zero_stage) if plugin is not None else 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    _fsync_dir(path.parent)
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
    failed = all_reduce_sum(torch.tensor([float(error is not None)], dtype=torch.float64))
    if failed.item() > 0:
        if error is not None:
            raise _save_failed(error, tmp, ckpt_dir) from error
        raise UserError(f"saving a checkpoint in {ckpt_dir} failed on another rank (see its "
                        "error line)")


def save(accelerator, ckpt_dir: Path, step: int, trainer_state: dict, keep: int) -> Path:
    """Save every rank's state as ``ckpt_dir/step_{step}``; collective: call on all ranks.

    Every file's size and CRC-32 go into the marker (:func:`check` verifies them on resume).
    A save that fails (a full disk) removes its temp folder and raises :class:`UserError`
    on every rank; the checkpoints already committed are untouched.
    """
    final = ckpt_dir / f"step_{step}"
    tmp = ckpt_dir / f".tmp-step_{step}"
    rank, world = accelerator.process_index, accelerator.num_processes

    def prepare():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        clean_leftovers(ckpt_dir)
        tmp.mkdir()

    def write():
        accelerator.save_state(str(tmp), safe_serialization=True)
        torch.save({**trainer_state, "rng": rng_state()}, tmp / f"trainer_{rank}.pt")

    _collectively(accelerator, prepare, tmp, ckpt_dir, main_only=True)
    _collectively(accelerator, write, tmp, ckpt_dir)
    accelerator.wait_for_everyone()
    files = {}
    for share in gather_objects(checksums(tmp, rank, world)):
        files.update(share)

    def commit():
        marker = {"step": step, "world_size": world, "zero_stage": zero_stage(accelerator),
                  "files": dict(sorted(files.items()))}
        with open(tmp / MARKER, "w") as f:
            json.dump(marker, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # from before a resume at an earlier step: this one replaces it
            remove(final)
        os.rename(tmp, final)
        _fsync_dir(ckpt_dir)
        for _, old in list_checkpoints(ckpt_dir)[:-keep]:
            remove(old)

    _collectively(accelerator, commit, tmp, ckpt_dir, main_only=True)
    return final


def any_world(model) -> None:
    """Let a DeepSpeed ZeRO engine load its checkpoints on another number of processes (a
    no-op for other models); call it once the model is prepared."""
    if hasattr(model, "_load_zero_checkpoint"):
        model._load_zero_checkpoint = functools.partial(_load_zero_shards, model)
        model._get_all_ckpt_names = functools.partial(_model_state_files, model)


def _load_zero_shards(engine, load_dir: str, tag: str, load_optimizer_states: bool = True) -> bool:
    """DeepSpeed's ZeRO shard loading, also onto another number of processes.

    DeepSpeed 0.19.8 refuses a checkpoint of another data-parallel world, and its universal
    conversion keeps only ``exp_avg``/``exp_avg_sq``. Here every saved shard is read and the
    flat fp32 weights and *every* optimizer state (AMSGrad's ``max_exp_avg_sq`` included) are
    re-cut for this world. Stages 1/2: DeepSpeed's own "elastic" merge (the checkpoint is saved
    unpadded, see :func:`toolkit.strategy.deepspeed_config`); its loader indexes the shards
    by this rank (out of range when the world grows) and wants a per-group ``step``, which
    torch's Adam keeps per parameter instead. Stage 3: :func:`_recut_zero3`.
    """
    from deepspeed.checkpoint.constants import BASE_OPTIMIZER_STATE, OPTIMIZER_STATE_DICT

    opt, world = engine.optimizer, engine.seq_dp_world_size
    if engine.zero_optimization_stage() == 3 and engine.loaded_checkpoint_dp_world_size != world:
        # DeepSpeed reads only this rank's shard at stage 3: read them all.
        names = engine._get_all_zero_checkpoint_names(load_dir, tag, engine.bfloat16_enabled())
        if names is None:
            return False
        saved = [engine.checkpoint_engine.load(name, map_location="cpu")[OPTIMIZER_STATE_DICT]
                 for name in names]
        shards = [_recut_zero3(opt, saved)] * world  # the loader takes this rank's entry
    else:
        shards = engine._get_all_zero_checkpoints(load_dir, tag)
    if shards is None:
        return False
    if engine.zero_optimization_stage() == 3:
        opt.load_state_dict(state_dict_list=shards, load_optimizer_states=load_optimizer_states,
                            load_from_fp32_weights=engine.zero_load_from_fp32_weights(),
                            checkpoint_folder=None, load_serial=None,
                            param_shapes=engine._get_zero_param_shapes())
        return True
    if not isinstance(shards[0][BASE_OPTIMIZER_STATE], list):  # saved without elastic_checkpoint
        if len(shards) != world:
            raise UserError(f"ZeRO checkpoint {load_dir} was saved without elastic_checkpoint; "
                            f"resume it on {len(shards)} processes")
        return type(engine)._load_zero_checkpoint(engine, load_dir, tag, load_optimizer_states)
    opt._wait_for_offload_copies()
    opt._load_global_state(shards[0])
    if load_optimizer_states:
        # One flat fp32 partition per group: merge the saved ones, cut this rank's. Through
        # torch's load_state_dict, which also drops any state the saved one lacks.
        inner, state = opt.optimizer, {}
        for i in range(len(inner.param_groups)):
            saved = [shard[BASE_OPTIMIZER_STATE][i] for shard in shards]
            state[i] = {}
            for key, value in saved[0].items():
                if torch.is_tensor(value) and value.dim() > 0:
                    value = opt._partition_base_optimizer_state(key, [s[key] for s in saved], i)
                state[i][key] = value.clone() if torch.is_tensor(value) else value
        inner.load_state_dict({"state": {i: s for i, s in state.items() if s},
                               "param_groups": inner.state_dict()["param_groups"]})
    if engine.zero_load_from_fp32_weights():
        opt._restore_from_elastic_fp32_weights(shards)
    else:
        opt._restore_from_bit16_weights()
    if load_optimizer_states:
        opt._link_all_hp_params()
    return True


def _model_state_files(engine, load_dir: str, tag: str) -> list[str]:
    """The engine's model-state files. ZeRO-3 names them by rank and a rank beyond the saved
    world finds none: it reads rank 0's (they differ only in partitioned placeholders)."""
    files = type(engine)._get_all_ckpt_names(engine, load_dir, tag)
    if not files and engine.zero_optimization_partition_weights():
        files = sorted(glob.glob(engine._get_ckpt_name(load_dir, tag, mp_placeholder="*",
                                                       pp_placeholder="0")))
    return files


def _recut_zero3(opt, shards: list[dict]) -> dict:
    """This rank's ZeRO-3 optimizer shard, cut from ``shards`` saved by another world size.

    ZeRO-3 gives rank r elements ``[r*s, (r+1)*s)`` of every parameter, ``s = ceil(numel /
    world)``, zero-padded, and a flat fp32 group (and each optimizer state) is those pieces
    concatenated in parameter order. Rebuild each parameter whole from the saved world's
    pieces, then cut this world's.
    """
    from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT

    saved, rank = len(shards), torch.distributed.get_rank(group=opt.dp_process_group)
    params = [p for group in opt.fp16_groups for p in group]

    def recut(flats: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        per_rank = [torch.cat([t.reshape(-1) for t in f]) for f in flats]
        sizes = [-(-p.ds_numel // saved) for p in params]
        if any(len(r) != sum(sizes) for r in per_rank):
            raise UserError("the ZeRO-3 checkpoint does not match this model's parameters")
        whole = [torch.cat([r[o:o + s] for r in per_rank])[:p.ds_numel] for p, s, o in
                 zip(params, sizes, itertools.accumulate([0] + sizes))]
        out, k = [], 0
        for group in opt.fp16_groups:
            pieces = []
            for p in group:
                s = p.partition_numel()
                piece = whole[k][rank * s:(rank + 1) * s]
                pieces.append(torch.nn.functional.pad(piece, (0, s - len(piece))))
                k += 1
            out.append(torch.cat(pieces))
        return out

    recut_keys = (FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT)
    state = {k: v for k, v in shards[0].items() if k not in recut_keys}
    state[FP32_FLAT_GROUPS] = recut([sd[FP32_FLAT_GROUPS] for sd in shards])
    optim = shards[0][OPTIMIZER_STATE_DICT]
    if len(optim["state"]) not in (0, len(opt.fp16_groups)):
        raise UserError(f"the ZeRO-3 checkpoint has {len(optim['state'])} optimizer sub-groups, "
                        f"this run {len(opt.fp16_groups)}: resume on the same number of processes")
    groups = range(len(opt.fp16_groups))
    per_group = {}
    for key, first in (optim["state"].get(0) or {}).items():
        if torch.is_tensor(first) and first.dim() > 0:
            per_group[key] = recut([[sd[OPTIMIZER_STATE_DICT]["state"][i][key] for i in groups]
                                    for sd in shards])
        else:  # the step: one per group, equal on every rank (its own tensor: stepped in place)
            per_group[key] = [optim["state"][i][key] for i in groups]
    state[OPTIMIZER_STATE_DICT] = {
        "state": {i: {key: v[i] for key, v in per_group.items()} for i in groups
                  if per_group},
        "param_groups": optim["param_groups"]}
    return state


def load(accelerator, path: Path) -> dict:
    """Restore model, optimizer, scheduler, scaler and RNG from ``path``; return trainer state."""
    marker = read_marker(path)
    rank, world = accelerator.process_index, accelerator.num_processes
    own = path / f"trainer_{rank}.pt"
    saved_stage, stage = marker.get("zero_stage", 0), zero_stage(accelerator)
    if saved_stage != stage and (saved_stage or stage):
        raise UserError(f"checkpoint {path} was saved under ZeRO stage {saved_stage} and this run "
                        f"uses stage {stage}: resume with the strategy it was saved with")
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
