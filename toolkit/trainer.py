"""One small trainer over ``accelerate.Accelerator``.

The loop: forward, loss, backward, clip, optimizer step, 1cycle step, zero grad, with
gradient accumulation, bf16/fp16, evaluation, ``metrics.jsonl`` + TensorBoard, a progress
bar on the main process, atomic checkpoints and exact resume. Data is any object of the
protocol of :mod:`toolkit.data.source` (the trainer shards it once the accelerator exists
and never asks its type). Extend the trainer by subclassing and overriding
:meth:`Trainer.train_step` (returns the loss of a micro-batch) and :meth:`Trainer.eval_step`
(returns sums to average over the evaluation set).

Why the schedule is not ``accelerator.prepare``d: a prepared scheduler steps
``num_processes`` times per optimizer step and mis-steps under accumulation (accelerate
#874, #963, #995). Why the data loader is not prepared either: the toolkit owns the data
order (:mod:`toolkit.sampler`) so that resume is exact mid-epoch (accelerate #2016).
"""

from __future__ import annotations

import bisect
import itertools
import math
import shutil
import signal
import sys
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from toolkit import batchnorm, checkpoint, lifecycle, lr_finder, parallel, provenance
from toolkit.config import OptimConfig, ScheduleConfig, TrainConfig
from toolkit.data.source import Data
from toolkit.distributed import all_reduce_sum, make_accelerator, micro_batch
from toolkit.errors import UserError
from toolkit.run_folder import RunFolder
from toolkit.schedule import beta1_of, set_lr

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class Stage:
    """One cycle of a run: ``epochs`` of a 1cycle ``schedule`` with a fresh ``optim``
    (fastai 0.7's ``fit_opt_sched`` built an optimizer per call), training the layer groups
    ``train_groups`` (indices; None: all) while the others are frozen. The post's Stanford
    Cars run: 20 epochs of the head at 1e-2, then 40 of everything at 3e-3 x (1/9, 1/3, 1).
    """

    epochs: int
    optim: OptimConfig
    schedule: ScheduleConfig
    train_groups: tuple[int, ...] | None = None


def head_first(epochs: int, optim: OptimConfig, schedule: ScheduleConfig, head: int,
               freeze_epochs: int = 0, freeze_lr: float = 1e-2) -> list[Stage]:
    """The post's fine-tuning: ``freeze_epochs`` of layer group ``head`` alone at max lr
    ``freeze_lr`` (its lr_mults dropped), then ``epochs`` of every group with ``optim``;
    one stage when ``freeze_epochs`` is 0. Stanford Cars: 20 at 1e-2, then 40 at 3e-3 x
    (1/9, 1/3, 1)."""
    stages = [Stage(epochs, optim, schedule)]
    if freeze_epochs:
        alone = dataclasses.replace(optim, lr=freeze_lr, lr_mults=None)
        stages.insert(0, Stage(freeze_epochs, alone, schedule, train_groups=(head,)))
    return stages


class _CurrentSchedule:
    """What a checkpoint holds of the schedule: the current stage's (its step)."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def state_dict(self) -> dict:
        return self.trainer.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.trainer.scheduler.load_state_dict(state)


class Trainer:
    """Train ``model`` on ``train_data`` with the optimizer and 1cycle of the configs, or
    through a list of ``stages`` (one folder, one ``metrics.jsonl`` with a ``stage`` field,
    resumable at any step of any stage).

    ``layer_groups`` (a list of modules) with ``optim.lr_mults`` gives discriminative
    learning rates, and is what a stage's ``train_groups`` counts. Build the model after
    seeding (``torch.manual_seed(train.seed)``) so every rank starts from the same weights.
    """

    def __init__(self, model: nn.Module, train_data: Data, eval_data: Data | None = None,
                 *, train: TrainConfig, optim: OptimConfig | None = None,
                 schedule: ScheduleConfig | None = None, stages: list[Stage] | None = None,
                 recipe_config: dict | None = None, layer_groups: list[nn.Module] | None = None):
        # train_cfg: the run's TrainConfig; recipe_config: the whole recipe config, as written
        # to config.json.
        self.train_cfg, self.recipe_config = train, recipe_config
        self.out = Path(train.output_dir)
        self.stages = list(stages) if stages else [Stage(train.epochs, optim, schedule)]
        check_stages(self.stages, len(layer_groups) if layer_groups else 1)
        if lifecycle.launched():
            lifecycle.exit_with_launcher()
        self.parallel = parallel.build(train.strategy, train.deepspeed_config)
        acc = self.accelerator = make_accelerator(
            self.parallel, batch_size=train.batch_size, grad_accum=train.grad_accum,
            clip=train.clip, precision=train.precision, project_dir=self.out,
            timeout_s=train.dist_timeout,
            freezes=any(s.train_groups is not None for s in self.stages))
        world, rank = acc.num_processes, acc.process_index
        self.micro_batch = micro_batch(train.batch_size, world, train.grad_accum)
        shard = dict(batch_size=train.batch_size, world=world, rank=rank, device=acc.device)
        self.train_data = train_data.shard(accum=train.grad_accum, **shard)
        self.eval_data = None if eval_data is None else eval_data.shard(accum=1, **shard)
        # Stage i runs steps [ends[i-1], ends[i]); one stage's cycle spans max_steps.
        self.stage_ends = list(itertools.accumulate(s.epochs for s in self.stages))
        self.stage_ends = [self.train_data.steps(e) for e in self.stage_ends]
        self.total_steps = self.stage_ends[-1]
        if train.max_steps is not None:
            self.total_steps = min(self.total_steps, train.max_steps)
        if len(self.stages) == 1:
            self.stage_ends = [self.total_steps]
        if train.sync_batchnorm:
            model = batchnorm.sync_batchnorm(model)

        def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
            optimizer = self.stages[0].optim.build(model, layer_groups)
            # Each parameter's layer group, for freezing (a ZeRO engine's groups hold flat
            # copies, FSDP2's the sharded parameters: read before wrapping).
            self._grouped = [(p, g["layer_group"]) for g in optimizer.param_groups
                             for p in g["params"]]
            return optimizer

        self.parallel.prepare(acc, model, build_optimizer)
        self.model, self.optimizer = self.parallel.model, self.parallel.optimizer
        self.stage = -1
        self.enter_stage(0)
        acc.register_for_checkpointing(_CurrentSchedule(self))
        # Dropout streams differ per rank; weights were seeded identically by the caller.
        torch.manual_seed(train.seed + 1_000_003 * rank)
        self.step = 0
        self._stop_signal: int | None = None
        self._claimed, self._lock, self._saved = False, None, None

    # ---- what subclasses override -------------------------------------------------------
    def train_step(self, batch) -> torch.Tensor:
        """Loss of one micro-batch (mean over its examples)."""
        inputs, targets = batch
        return F.cross_entropy(self.model(inputs), targets)

    def eval_step(self, batch) -> dict[str, torch.Tensor]:
        """Sums over one batch, with ``count``; the trainer reports ``sum / count``."""
        inputs, targets = batch
        logits = self.model(inputs)
        return {"loss": F.cross_entropy(logits.float(), targets, reduction="sum"),
                "accuracy": (logits.argmax(-1) == targets).sum(),
                "count": torch.tensor(len(targets))}

    # ---- per-rank state a subclass carries across steps (an RNN's hidden state) --------
    def extra_state(self) -> dict:
        """Saved in this rank's checkpoint file."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what :meth:`extra_state` returned."""

    # ---- the loop ---------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def folder(self) -> RunFolder:
        """The output folder's files."""
        return RunFolder(self.out)

    def unwrapped(self) -> nn.Module:
        """The model without its strategy's wrapper."""
        return self.parallel.unwrapped()

    def epoch_at(self, step: int) -> float:
        return self.train_data.epoch_at(step)

    def stage_at(self, step: int) -> int:
        """The stage that takes optimizer step ``step + 1`` (the last one at the end)."""
        return min(bisect.bisect_right(self.stage_ends, step), len(self.stages) - 1)

    def enter_stage(self, index: int) -> None:
        """Set up stage ``index`` at its first step: a fresh optimizer state, the stage's
        hyperparameters in every group, its frozen layers and its 1cycle. The schedule drives
        the torch optimizer that really steps (inside its strategy's wrapper, if any).

        A frozen layer group stops taking gradients (``requires_grad``) and its BatchNorms
        are marked ``frozen`` (:class:`~toolkit.models.FreezableSequential` keeps them in
        eval mode). A strategy that cannot stop a group's gradients (a ZeRO engine) steps
        it at lr 0 instead (:meth:`~toolkit.parallel.base.Strategy.freeze`)."""
        if index == self.stage:
            return
        stage, inner = self.stages[index], self.parallel.torch_optimizer()
        inner.state.clear()
        n = 1 + max(g for _, g in self._grouped)
        mults = stage.optim.lr_mults or (1.0,) * n
        trains = [stage.train_groups is None or g in stage.train_groups for g in range(n)]
        factors = self.parallel.freeze(self._grouped, trains)
        for group in inner.param_groups:
            g = group["layer_group"]
            stage.optim.write_hparams(group, mults[g] * factors[g])
        group_of = {id(p): g for p, g in self._grouped}
        for m in self.unwrapped().modules():
            if isinstance(m, _BatchNorm):
                own = [group_of[id(p)] for p in m.parameters(recurse=False) if id(p) in group_of]
                m.frozen = bool(own) and not any(trains[g] for g in own)
        start = self.stage_ends[index - 1] if index else 0
        self.scheduler = stage.schedule.build(inner, self.stage_ends[index] - start)
        self.stage = index

    def print(self, *args) -> None:
        self.accelerator.print(*args)

    def optimizer_step(self, it, step_schedule: bool = True) -> torch.Tensor:
        """Accumulate ``grad_accum`` micro-batches from ``it``, clip, step; mean loss."""
        device, accum = self.accelerator.device, self.train_cfg.grad_accum
        total = torch.zeros((), device=device)
        for a in range(accum):
            batch = send_to_device(next(it), device)
            loss = self.parallel.forward_backward(lambda: self.train_step(batch), a == accum - 1)
            total += loss.detach().float()
        self.parallel.step(self.train_cfg.clip)
        if step_schedule:
            self.scheduler.step()
        return total / accum

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.eval_data is None:
            return {}
        self.model.eval()
        sums: dict[str, torch.Tensor] = {}
        for batch in self.eval_data.eval_batches():
            batch = send_to_device(batch, self.accelerator.device)
            for k, v in self.eval_step(batch).items():
                sums[k] = sums.get(k, 0) + v.detach().double().cpu()
        self.model.train()
        keys = sorted(sums)
        totals = all_reduce_sum(torch.stack([sums[k] for k in keys]))
        count = totals[keys.index("count")].item()
        return {f"valid_{k}": totals[i].item() / count for i, k in enumerate(keys)
                if k != "count"}

    def lr_and_beta1(self) -> dict[str, float]:
        groups = self.scheduler.optimizer.param_groups
        key = "beta1" if "betas" in groups[0] else "momentum"
        return {"lr": max(float(g["lr"]) for g in groups), key: beta1_of(groups[0])}

    def log(self, row: dict) -> None:
        if self.is_main:
            self.folder.append_metrics(row)
        self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def _on_signal(self, signum, frame) -> None:
        # Only a flag: I/O in a handler can deadlock mid-collective (Lightning #21406).
        self._stop_signal = signum

    def claim_output_dir(self) -> None:
        """Make this run the only one writing ``output_dir`` (:func:`lifecycle.claim`);
        collective, and a no-op once done."""
        if self._claimed:
            return
        error = None
        if self.is_main:
            try:
                self._lock = lifecycle.claim(self.folder.lock)
            except UserError as e:
                error = e
        if all_reduce_sum(torch.tensor([float(error is not None)])).item() > 0:
            raise error or UserError(f"--output-dir {self.out} is in use by another run")
        self._claimed = True

    def start(self) -> None:
        """Check and claim the output folder, resume if asked, write config.json, open
        trackers."""
        ckpt_dir = self.folder.checkpoints
        # A bad --resume path is refused before anything is written.
        checkpoint.candidates(self.train_cfg.resume, ckpt_dir)
        if self.train_cfg.resume is None and self.folder.holds_run():
            raise UserError(f"--output-dir {self.out} already holds a run; pass --resume auto "
                            "to continue it, or choose another --output-dir")
        self.claim_output_dir()
        resume = checkpoint.resume_point(self.accelerator, self.train_cfg.resume, ckpt_dir)
        if self.is_main and self.recipe_config is not None and resume is None:
            self.folder.write_config(self.recipe_config)
        self.accelerator.wait_for_everyone()
        if resume is not None:
            # The stage first: the checkpoint holds that stage's optimizer and schedule.
            self.enter_stage(self.stage_at(checkpoint.read_marker(resume)["step"]))
            state = checkpoint.load(self.parallel, resume)
            self.step = state["step"]
            self._saved = (self.step, resume)  # no second save of the same step
            self.load_extra_state(state.get("extra", {}))
            if state["total_steps"] != self.total_steps:
                raise UserError(f"checkpoint {resume} belongs to a run of "
                                f"{state['total_steps']} steps, this one has {self.total_steps}: "
                                "resume with the same --epochs/--max-steps/--batch-size")
            self.print(f"resumed from {resume} at step {self.step}/{self.total_steps}")
        if self.is_main:  # only once the resume is sound: a refused run changes nothing
            provenance.record(self.out, self.accelerator.device,
                              self.accelerator.num_processes, self.parallel.name)
            self.folder.repair_metrics()
        self.accelerator.init_trackers("tensorboard")
        acc, opt = self.accelerator, self.scheduler.optimizer
        self.print(f"training {self.total_steps} steps ({self.epochs_str()}) on "
                   f"{acc.num_processes} process(es), {acc.distributed_type.value} "
                   f"({self.parallel.name}), "
                   f"{acc.device}, {self.train_cfg.precision}; "
                   f"global batch {self.train_cfg.batch_size} = "
                   f"{acc.num_processes} x {self.train_cfg.grad_accum} x {self.micro_batch}; "
                   f"optimizer {type(opt).__name__} ({getattr(opt, 'impl', '?')}"
                   f"{', amsgrad' if opt.defaults.get('amsgrad') else ''})")

    def save(self) -> Path:
        if self._saved is None or self._saved[0] != self.step:  # not twice at one step
            path = checkpoint.save(self.parallel, self.folder.checkpoints, self.step,
                                   {"step": self.step, "total_steps": self.total_steps,
                                    "extra": self.extra_state()},
                                   self.train_cfg.keep_checkpoints)
            self._saved = (self.step, path)
        return self._saved[1]

    def epochs_str(self) -> str:
        return f"{self.epoch_at(self.total_steps):.3g} epochs"

    def fit(self) -> dict:
        """Train to the end or to a stop signal. Returns ``stopped`` (a signal stopped it,
        a checkpoint is saved), ``step``, ``checkpoint`` and, when finished, ``epochs``,
        ``wall_time_s`` and the last train and eval metrics."""
        cfg, acc = self.train_cfg, self.accelerator
        self.start()
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        started = time.time()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (self.is_main
                   and cfg.progress), dynamic_ncols=True, desc="train",
                   mininterval=0.1 if sys.stderr.isatty() else 10)
        it = self.train_data.batches(self.step)
        logged, metrics = torch.zeros(2, dtype=torch.float64), {}
        self.model.train()
        try:
            while self.step < self.total_steps:
                schedule = {"stage": self.stage, **self.lr_and_beta1()}
                loss = self.optimizer_step(it)
                self.step += 1
                self.enter_stage(self.stage_at(self.step))  # before a checkpoint of this step
                # One small all-reduce per step: the global loss, and collective decisions
                # on a non-finite loss and on a stop signal (every rank must agree).
                flags = all_reduce_sum(torch.tensor(
                    [loss.item(), float(not math.isfinite(loss.item())),
                     float(self._stop_signal is not None)], dtype=torch.float64))
                if flags[1] > 0:
                    raise UserError(f"non-finite loss ({loss.item()}) at step {self.step}: "
                                    f"lower --optim.lr (now {schedule['lr']:.3g} at this step) "
                                    "or set --clip; no checkpoint was written for this step")
                logged += torch.tensor([flags[0] / acc.num_processes, 1.0], dtype=torch.float64)
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    train_loss = metrics["train_loss"] = (logged[0] / logged[1]).item()
                    self.log({"step": self.step, "epoch": round(self.epoch_at(self.step), 4),
                              **schedule, "train_loss": train_loss})
                    bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{schedule['lr']:.3g}")
                    logged.zero_()
                due = (self.step % cfg.eval_every == 0 if cfg.eval_every
                       else self.epoch_at(self.step).is_integer())
                if due or self.step == self.total_steps:
                    evaluated = self.evaluate()
                    metrics.update(evaluated)
                    if evaluated:
                        self.log({"step": self.step, "stage": schedule["stage"],
                                  "epoch": round(self.epoch_at(self.step), 4), **evaluated})
                        if self.is_main:
                            bar.write(f"step {self.step}: " + " ".join(
                                f"{k} {v:.4f}" for k, v in evaluated.items()))
                stop = flags[2] > 0
                if stop or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
                    path = self.save()
                if stop:
                    name = signal.Signals(self._stop_signal or signal.SIGTERM).name \
                        if self._stop_signal else "a stop signal on another rank"
                    self.print(f"received {name}: saved {path} at step {self.step}/"
                               f"{self.total_steps}; resume with the same command and "
                               "--resume auto")
                    return {"stopped": True, "step": self.step, "checkpoint": str(path)}
        finally:
            bar.close()
            for s, h in previous.items():
                signal.signal(s, h)
        if self.eval_data is not None and not any(k.startswith("valid_") for k in metrics):
            metrics.update(self.evaluate())  # resumed at its end: no step, no evaluation yet
        path = self.save()
        return {"stopped": False, "step": self.step, "epochs": round(self.epoch_at(self.step), 4),
                "wall_time_s": round(time.time() - started, 2), "checkpoint": str(path),
                **metrics}

    def lr_find(self, start_lr: float = 1e-7, end_lr: float = 10.0, num_steps: int = 100,
                smooth: float = 0.98, stop_div: float = 4.0) -> dict:
        """LR range test (:mod:`toolkit.lr_finder`): sweep the max lr from ``start_lr`` to
        ``end_lr`` through this trainer's own step, write ``lr_find.json``/``.png``, and
        leave the trainer exactly as it was. Collective. Groups keep their lr ratios."""
        lr_finder.check_sweep(start_lr, end_lr, num_steps)
        self.claim_output_dir()
        acc, opt = self.accelerator, self.scheduler.optimizer
        # Snapshot through the strategy's checkpoint: the one way that also restores sharded
        # states, an engine's counters and the loss scaler. Collective, like the sweep.
        snapshot = self.folder.lr_find_state
        if self.is_main:
            shutil.rmtree(snapshot, ignore_errors=True)
            snapshot.mkdir(parents=True)
        acc.wait_for_everyone()
        self.parallel.save(snapshot)
        saved_rng, saved_step = checkpoint.rng_state(), self.step
        top = max(self.scheduler.base_lrs)
        ratios = [b / top for b in self.scheduler.base_lrs]
        it = self.train_data.batches(self.step)
        self.model.train()

        def step(lr: float) -> float:
            for group, r in zip(opt.param_groups, ratios):
                set_lr(group, lr * r)
            loss = all_reduce_sum(self.optimizer_step(it, step_schedule=False).double())
            return loss.item() / acc.num_processes

        result = lr_finder.sweep(step, start_lr, end_lr, num_steps, smooth, stop_div)
        self.parallel.load(snapshot)
        checkpoint.set_rng_state(saved_rng)
        self.step = saved_step
        acc.wait_for_everyone()
        if self.is_main:
            shutil.rmtree(snapshot)
            lr_finder.write(result, self.out)
        acc.wait_for_everyone()
        return result

    def close(self) -> None:
        """End the run: finish trackers, leave the process group (no collectives after) and
        release the output folder."""
        self.accelerator.end_training()
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def check_stages(stages: list[Stage], layer_groups: int) -> None:
    """One line for a stage the run cannot take (before anything runs)."""
    first = stages[0].optim
    for i, stage in enumerate(stages):
        if stage.epochs < 1:
            raise UserError(f"stage {i} has {stage.epochs} epochs; each stage needs >= 1")
        stage.optim.check_layer_groups(layer_groups)
        if (stage.optim.name, stage.optim.amsgrad, stage.optim.impl) != \
                (first.name, first.amsgrad, first.impl):
            raise UserError(f"stage {i} uses {stage.optim.name} (amsgrad {stage.optim.amsgrad}, "
                            f"{stage.optim.impl}) and stage 0 {first.name} (amsgrad "
                            f"{first.amsgrad}, {first.impl}): the stages of a run share them")
        bad = [g for g in stage.train_groups or () if not 0 <= g < layer_groups]
        if bad or stage.train_groups == ():
            raise UserError(f"stage {i} trains layer groups {stage.train_groups}; the model has "
                            f"{layer_groups} (0..{layer_groups - 1}), name at least one")
