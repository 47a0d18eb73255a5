"""Process-group set-up that does not train each rank alone by accident.

Accelerate 1.15 on a machine without GPU gives every process launched by ``torchrun`` or
``accelerate launch --multi_gpu`` a world of one (``DistributedType.NO``), and the run
trains N independent models without a word. ``ACCELERATE_USE_CPU=true`` set before
``Accelerator()`` makes it ``MULTI_CPU`` over gloo. We set it, then check the world size we
really train with against the launcher's ``WORLD_SIZE``. What a strategy needs of the
environment and of ``Accelerator()`` is its own (:mod:`toolkit.parallel`).

:data:`Precision` names the precisions a run can have, and :func:`micro_batch` is the one
split of a global batch over processes and accumulation steps.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from toolkit.parallel.base import Strategy
from toolkit.errors import UserError

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


def launcher_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def micro_batch(batch_size: int, world: int, grad_accum: int = 1) -> int:
    """Examples per process and micro-batch: the global ``batch_size`` (per optimizer step)
    over ``world`` processes and ``grad_accum`` accumulation steps; a one-line
    :class:`UserError` when it does not divide."""
    parts = world * grad_accum
    if batch_size < 1 or batch_size % parts:
        raise UserError(f"batch_size={batch_size} must be a positive multiple of processes x "
                        f"grad_accum = {world} x {grad_accum} = {parts}")
    return batch_size // parts


def check_world_size(accelerator: Accelerator) -> None:
    """Stop if Accelerate trains with another world size than the launcher started."""
    expected = launcher_world_size()
    got = accelerator.num_processes
    real = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    # A gloo process group alone leaves DistributedType.NO: no DDP wrapping, no gradient sync.
    alone = expected > 1 and accelerator.distributed_type.value == "NO"
    if got != expected or real != expected or alone:
        raise UserError(f"launcher started WORLD_SIZE={expected} processes but this one trains "
                        f"in a world of {got} (process group: {real}, "
                        f"{accelerator.distributed_type}); each rank would train alone. "
                        "On CPU set ACCELERATE_USE_CPU=true before Accelerator()")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks (no-op in a single process); NCCL reduces on the GPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        on = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else t.device
        moved = t.to(on)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        return moved.to(t.device)
    return t


def any_failed(error: BaseException | None) -> bool:
    """Whether some rank holds an ``error`` (collective): then every rank raises, and none
    is left waiting in a collective that the failed one never joins."""
    flag = torch.tensor([float(error is not None)], dtype=torch.float64)
    return all_reduce_sum(flag).item() > 0


def mean_of_sums(sums: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Each ``sums[k] / sums["count"]``, both summed over ranks in float64 (collective):
    an evaluation's means over every rank's examples."""
    keys = sorted(sums)
    totals = all_reduce_sum(torch.stack([torch.as_tensor(sums[k], dtype=torch.float64)
                                         for k in keys]))
    count = totals[keys.index("count")].item()
    if not count:
        raise ValueError("the evaluation batches hold no example")
    return {k: totals[i].item() / count for i, k in enumerate(keys) if k != "count"}


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def make_accelerator(strategy: Strategy, *, batch_size: int, grad_accum: int,
                     clip: float | None, precision: Precision, project_dir: Path,
                     freezes: bool = False, timeout_s: float = 600) -> Accelerator:
    """The ``Accelerator`` for a run of ``strategy`` (:mod:`toolkit.parallel`).

    ``batch_size`` is the global batch per optimizer step; the DeepSpeed config, when there
    is one, is generated from these values so that it cannot disagree with the loop.
    ``freezes``: a stage trains only some layer groups. ``timeout_s``: how long a collective
    waits for the other ranks before it fails (a rank whose node died never answers; torch's
    default is 10 to 30 minutes).
    """
    world = launcher_world_size()
    strategy.prepare_env(world)
    kwargs = strategy.accelerator_kwargs(
        micro_batch=micro_batch(batch_size, world, grad_accum), grad_accum=grad_accum,
        world=world, clip=clip, precision=precision, freezes=freezes)
    if world > 1:
        # Named on CPU, or Accelerate's DeepSpeed set-up reports one process.
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        kwargs["kwargs_handlers"] = [*kwargs["kwargs_handlers"], InitProcessGroupKwargs(
            backend=backend, timeout=datetime.timedelta(seconds=timeout_s))]
    accelerator = Accelerator(mixed_precision="no" if precision == "fp32" else precision,
                              project_dir=str(project_dir), **kwargs)
    check_world_size(accelerator)
    strategy.grad_accum = grad_accum
    strategy.check(precision=precision, clip=clip, freezes=freezes, device=accelerator.device)
    if precision == "fp16" and accelerator.device.type == "cpu" and accelerator.scaler is None:
        # Accelerate 1.15 would silently train in fp32 on CPU, though torch has fp16 autocast
        # and a loss scaler there: turn on both, as it does on a GPU (save_state keeps it).
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu")
    return accelerator
