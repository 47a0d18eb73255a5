"""A run in its folder: claimed by one run, resumed from its newest sound checkpoint, and
checkpointed into, so that a resumed run equals an uninterrupted one (the trainer's loop
calls these with itself).

:func:`start` refuses a folder that holds another run unless ``--resume`` is given, claims
the folder (:func:`toolkit.lifecycle.claim`, over all ranks), finds and verifies the resume
point (:func:`toolkit.checkpoint.resume_point`), writes ``config.json`` on a fresh start,
loads the checkpoint (its stage first: it holds that stage's optimizer and schedule), and
records the start (``provenance.json``) only once all that is sound: a refused run changes
nothing. :func:`save` writes a checkpoint at most once per step.
"""

from __future__ import annotations

from pathlib import Path

from toolkit import checkpoint, lifecycle, provenance, trackers
from toolkit.distributed import any_failed
from toolkit.errors import UserError
from toolkit.optim import averaged_weights, schedule_free
from toolkit.run_folder import RunFolder
from toolkit.stages import stage_at


def claim(trainer) -> None:
    """Make this run the only one writing its folder (:func:`lifecycle.claim`); collective,
    and a no-op once done."""
    if trainer._claimed:
        return
    error = None
    if trainer.is_main:
        try:
            trainer._lock = lifecycle.claim(trainer.folder.lock)
        except UserError as e:
            error = e
    if any_failed(error):
        raise error or UserError(f"--output-dir {trainer.out} is in use by another run")
    trainer._claimed = True


def start(trainer) -> None:
    """Seed, check and claim the run folder, resume if asked, write config.json, open
    trackers; collective."""
    trainer.seed_rank()
    folder, flag, acc = trainer.folder, trainer.train_cfg.resume, trainer.accelerator
    checkpoint.candidates(flag, folder.checkpoints)  # a bad path: refused before any write
    if trainer.clock.target is not None and trainer.eval_data is None:
        raise UserError("--target needs an evaluation, and this run has no evaluation data")
    if flag is None and folder.holds_run():
        raise UserError(f"--output-dir {trainer.out} already holds a run; pass --resume auto "
                        "to continue it, or choose another --output-dir")
    claim(trainer)
    path = checkpoint.resume_point(acc, flag, folder.checkpoints)
    if trainer.is_main and trainer.recipe_config is not None and path is None:
        folder.write_config(trainer.recipe_config)
    acc.wait_for_everyone()
    if path is not None:
        trainer.enter_stage(stage_at(trainer.stage_ends, checkpoint.read_marker(path)["step"]))
        state = checkpoint.load(trainer.parallel, path)
        inner = trainer.parallel.torch_optimizer()
        if schedule_free(inner):  # saved at its average: back to its training point
            inner.train()
        trainer.step, trainer._saved = state["step"], (state["step"], path)
        trainer.load_extra_state(state.get("extra", {}))
        if "clock" in state:  # checkpoints from before the clock: no seconds to add
            trainer.clock.load_state_dict(state["clock"])
        if state["total_steps"] != trainer.total_steps:
            raise UserError(f"checkpoint {path} belongs to a run of {state['total_steps']} "
                            f"steps, this one has {trainer.total_steps}: resume with the same "
                            "--epochs/--max-steps/--batch-size")
        trainer.print(f"resumed from {path} at step {trainer.step}/{trainer.total_steps}")
    start_trackers(trainer, path)
    if trainer.is_main:
        provenance.record(trainer.out, acc.device, acc.num_processes, trainer.parallel.name)
        folder.repair_metrics()
    trainer.print(describe(trainer))


def start_trackers(trainer, path: Path | None) -> None:
    """Start ``--trackers`` on the main process, continuing the tracked runs of the resumed
    checkpoint's folder; collective, so that a failed start stops every rank."""
    error, cfg = None, trainer.train_cfg
    if trainer.is_main:
        try:
            trainer.accelerator.trackers = trackers.start(
                cfg.trackers, trainer.folder, path and RunFolder(path.parent.parent),
                cfg.tracker_project, trainer.recipe_config,
                provenance.git_state()[0] if cfg.trackers else None)
        except UserError as e:
            error = e
    if any_failed(error):
        raise error or UserError("--trackers could not start on the main process")


def describe(trainer) -> str:
    """The line a run starts with: steps, processes, strategy, precision, batch, optimizer."""
    acc, opt, cfg = trainer.accelerator, trainer.scheduler.optimizer, trainer.train_cfg
    amsgrad = ", amsgrad" if opt.defaults.get("amsgrad") else ""
    return (f"training {trainer.total_steps} steps ({trainer.epoch_at(trainer.total_steps):.3g} "
            f"epochs) on {acc.num_processes} process(es), {acc.distributed_type.value} "
            f"({trainer.parallel.name}), {acc.device}, {cfg.precision}; global batch "
            f"{cfg.batch_size} = {acc.num_processes} x {cfg.grad_accum} x "
            f"{trainer.micro_batch}; optimizer {type(opt).__name__} "
            f"({getattr(opt, 'impl', '?')}{amsgrad})")


def save(trainer) -> Path:
    """A checkpoint of this step (the one already written, if any); collective."""
    if trainer._saved is None or trainer._saved[0] != trainer.step:
        # A schedule-free optimizer's checkpoint holds its averaged weights (what evaluating
        # a checkpoint scores) and resumes from them (its train() is the same arithmetic).
        with averaged_weights(trainer.parallel.torch_optimizer()):
            path = checkpoint.save(trainer.parallel, trainer.folder.checkpoints, trainer.step,
                                   {"step": trainer.step, "total_steps": trainer.total_steps,
                                    "extra": trainer.extra_state(),
                                    "clock": trainer.clock.state_dict()},
                                   trainer.train_cfg.keep_checkpoints)
        trainer._saved = (trainer.step, path)
    return trainer._saved[1]
