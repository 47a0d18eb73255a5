"""The one entry of every recipe: a recipe is its config, its presets and a ``build``.

    if __name__ == "__main__":
        recipe.main(PRESETS, build, __doc__)

:func:`main` parses and validates the command line (``--preset`` then any field), seeds,
calls ``build(cfg)`` for a :class:`Run` (the trainer and an optional final evaluation),
runs the LR range test (``--lr-find``) or the fit, then the final evaluation (the cache
pointer, test-time augmentation), writes ``results.json`` once, closes the trackers and the
process group, and exits with one of:

- ``0`` (:data:`FINISHED`): the run is done;
- ``1`` (:data:`CRASHED`): a crash (a traceback), or another process of the run died (one
  ``error:`` line says so; resume from the newest checkpoint);
- ``2`` (:data:`BAD_INPUT`): a bad value, missing data, a damaged checkpoint, a full disk,
  a non-finite loss: one ``error:`` line says what;
- ``75`` (:data:`STOPPED`, ``EX_TEMPFAIL``): stopped by SIGTERM/SIGUSR1 with a checkpoint
  saved: run the same command with ``--resume auto`` to go on (what a Slurm requeue script
  keys on). ``torchrun`` and ``accelerate launch`` report a worker's non-zero exit as their
  own failure (exit 1, the worker's code in their summary).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from toolkit import lifecycle
from toolkit.config import parse
from toolkit.errors import UserError, error_line
from toolkit.optim import averaged_weights
from toolkit.run_folder import RunFolder
from toolkit.trainer import Trainer

FINISHED, CRASHED, BAD_INPUT, STOPPED = 0, 1, 2, 75


def lost_peer(e: BaseException) -> bool:
    """A collective failed because another rank is gone: its sockets closed (gloo, NCCL)
    or it stopped answering for ``--dist-timeout`` seconds."""
    import torch.distributed as dist

    text = str(e)
    return isinstance(e, dist.DistError) or any(
        s in text for s in ("Connection reset by peer", "Connection closed by peer",
                            "Timed out waiting", "NCCL communicator was aborted",
                            "Broken pipe", "timed out"))


@dataclass
class Run:
    """What a recipe's ``build(cfg)`` returns."""

    trainer: Trainer
    final_evaluation: Callable[[], dict] | None = None
    """After a finished fit: more results (e.g. test perplexity with the cache pointer)."""
    summary: Callable[[dict], str] | None = None
    """The line printed at the end, from the results."""
    model: tuple[Callable[..., nn.Module], dict] | None = None
    """The recipe's function that builds the model and its arguments (JSON values): a
    finished run writes both beside its weights (:func:`export_model`), and
    :func:`load_model` rebuilds the trained model from the run folder in one call."""


def _function_name(fn: Callable) -> str:
    """``module:qualname``; a recipe run as a script is ``__main__``: name its module."""
    module = fn.__module__
    if module == "__main__":
        path = Path(sys.modules["__main__"].__file__).resolve()
        module = f"{path.parent.name}.{path.stem}" if path.parent.name == "recipes" else path.stem
    return f"{module}:{fn.__qualname__}"


def export_model(run: Run) -> None:
    """Write the trained weights as one fp32 ``model.safetensors`` (gathered from ZeRO-3
    or FSDP2 shards and offload) and ``model.json`` (builder and arguments) into the run
    folder, atomically. Collective: every rank calls it."""
    trainer = run.trainer
    with averaged_weights(trainer.parallel.torch_optimizer()):  # schedule-free: its average
        state = trainer.parallel.full_state_dict()
    if trainer.is_main:
        trainer.folder.write_weights({k: v.float() if v.is_floating_point() else v
                                      for k, v in state.items()})
        if run.model is not None:
            fn, args = run.model
            trainer.folder.write_model_spec({"builder": _function_name(fn), "args": args})
    trainer.accelerator.wait_for_everyone()


def load_model(run_dir: str | Path) -> nn.Module:
    """The trained model of a finished run folder, in eval mode, on the CPU."""
    import importlib

    folder = RunFolder(run_dir)
    for path in (folder.model_spec, folder.weights):
        if not path.is_file():
            raise UserError(f"{folder.path} has no {path.name}: not a finished run folder (a "
                            "run writes it when it finishes)")
    spec = folder.read_model_spec()
    module, _, name = spec["builder"].partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"{folder.model_spec}: cannot import {spec['builder']} ({e})") from None
    model = fn(**spec["args"])
    model.load_state_dict(folder.read_weights())
    return model.eval()


def execute(run: Run, lr_find: bool) -> int:
    """LR range test or fit, final evaluation, ``results.json``; the exit code."""
    trainer = run.trainer
    try:
        if lr_find:
            result = trainer.lr_find()
            trainer.print(f"lr_find suggestions: {result['suggestions']} "
                          f"(plot: {trainer.folder.lr_find_plot})")
            return FINISHED
        results = trainer.fit()
        if results.pop("stopped"):
            return STOPPED
        if run.final_evaluation is not None:
            results.update(run.final_evaluation())
        export_model(run)
        write_results(trainer, results)
        if run.summary is not None:
            trainer.print(run.summary(results))
        return FINISHED
    finally:
        trainer.close()


def write_results(trainer: Trainer, results: dict) -> None:
    if trainer.is_main:
        trainer.folder.write_results(results)


def main(presets: Mapping[str, Callable], build: Callable[..., Run],
         description: str | None = None, argv: list[str] | None = None) -> None:
    """Parse, seed, build, train (or find the lr), evaluate, write, close; exit 0, 2 or 75."""
    run = None
    try:
        cfg = parse(presets, argv, description=(description or "").strip().splitlines()[0]
                    if description else None)
        if lifecycle.launched():  # a worker: it ends with its launcher
            lifecycle.exit_with_launcher()
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        run = build(cfg)
        code = execute(run, cfg.train.lr_find)
    except UserError as e:
        error_line(e)
        code = BAD_INPUT
    except RuntimeError as e:
        if run is None or not lost_peer(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        error_line(UserError(
            f"lost contact with another process of this run ({first[:200]}): a process or "
            f"node died; the newest complete checkpoint in {run.trainer.folder.checkpoints} "
            "is where --resume auto goes on"))
        code = CRASHED
    if run is not None and run.trainer.parallel.hard_exit():
        lifecycle.exit_process(code)
    sys.exit(code)
