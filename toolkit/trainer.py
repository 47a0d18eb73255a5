"""One small trainer over ``accelerate.Accelerator``: the loop, and nothing else.

The loop: forward, loss, backward, clip, optimizer step, 1cycle step, zero grad, with
gradient accumulation, bf16/fp16, evaluation, ``metrics.jsonl`` + TensorBoard, a progress
bar on the main process, atomic checkpoints and exact resume. How a step is spread over
processes is its strategy's (:mod:`toolkit.parallel`), the files of the run folder are
:class:`~toolkit.run_folder.RunFolder`'s, stages are :mod:`toolkit.stages`, and the LR
range test is :mod:`toolkit.lr_finder`'s. Data is any object of the protocol of
:mod:`toolkit.data.source` (the trainer shards it once the accelerator exists and never asks
its type). Extend the trainer by subclassing and overriding :meth:`Trainer.train_step`
(returns the loss of a micro-batch) and :meth:`Trainer.eval_step` (returns sums to average
over the evaluation set).

Building a trainer starts nothing: the launcher watchdog and the seed of the initial weights
are the entry's (:func:`toolkit.recipe.main`), each rank's dropout stream is seeded when a
run starts (:meth:`Trainer.fit`, :meth:`Trainer.lr_find`), and the run folder is not touched
before then (:mod:`toolkit.resume` claims it, resumes from it and checkpoints into it).

Why the schedule is not ``accelerator.prepare``d: a prepared scheduler steps
``num_processes`` times per optimizer step and mis-steps under accumulation (accelerate
#874, #963, #995). Why the data loader is not prepared either: the toolkit owns the data
order (:mod:`toolkit.sampler`) so that resume is exact mid-epoch (accelerate #2016).
"""

from __future__ import annotations

import itertools
import math
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm

from toolkit import batchnorm, lr_finder, parallel, resume
from toolkit.config import OptimConfig, ScheduleConfig, TrainConfig
from toolkit.data.source import Data
from toolkit.distributed import all_reduce_sum, make_accelerator, mean_of_sums, micro_batch
from toolkit.errors import UserError
from toolkit.optim import averaged_weights
from toolkit.run_folder import RunFolder
from toolkit.schedule import beta1_of
from toolkit.stages import Stage, check_stages, stage_at, stage_ends
from toolkit.target import Clock, Target

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
BN_BATCHES = 16  # micro-batches that recompute BatchNorm statistics at averaged weights


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
    ``recipe_config``: the whole recipe config, written to ``config.json``.
    ``label_smoothing``: of the training loss (the evaluation's loss stays the plain NLL).
    """

    def __init__(self, model: nn.Module, train_data: Data, eval_data: Data | None = None,
                 *, train: TrainConfig, optim: OptimConfig | None = None,
                 schedule: ScheduleConfig | None = None, stages: list[Stage] | None = None,
                 recipe_config: dict | None = None, layer_groups: list[nn.Module] | None = None,
                 label_smoothing: float = 0.0):
        self.train_cfg, self.recipe_config = train, recipe_config
        self.label_smoothing = label_smoothing
        self.out, self.folder = Path(train.output_dir), RunFolder(train.output_dir)
        self.stages = list(stages) if stages else [Stage(train.epochs, optim, schedule)]
        check_stages(self.stages, len(layer_groups) if layer_groups else 1)
        self.parallel = parallel.build(train.strategy, train.deepspeed_config)
        acc = self.accelerator = make_accelerator(
            self.parallel, batch_size=train.batch_size, grad_accum=train.grad_accum,
            clip=train.clip, precision=train.precision, project_dir=self.out,
            timeout_s=train.dist_timeout,
            freezes=any(s.train_groups is not None for s in self.stages))
        self.micro_batch = micro_batch(train.batch_size, acc.num_processes, train.grad_accum)
        shard = dict(batch_size=train.batch_size, world=acc.num_processes,
                     rank=acc.process_index, device=acc.device)
        self.train_data = train_data.shard(accum=train.grad_accum, **shard)
        self.eval_data = None if eval_data is None else eval_data.shard(accum=1, **shard)
        self.stage_ends, self.total_steps = stage_ends(self.stages, self.train_data.steps,
                                                       train.max_steps)
        if train.sync_batchnorm:
            model = batchnorm.sync_batchnorm(model)

        def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
            optimizer = self.stages[0].optim.build(model, layer_groups, self.total_steps)
            # Each parameter's layer group, for freezing, read from the optimizer the strategy
            # builds: before a ZeRO engine swaps in flat copies, over FSDP2's shards.
            self._grouped = [(p, g["layer_group"]) for g in optimizer.param_groups
                             for p in g["params"]]
            return optimizer

        if train.compile:
            self.parallel.compile(model, train.compile_mode)
        self.parallel.prepare(acc, model, build_optimizer)
        self.model, self.optimizer = self.parallel.model, self.parallel.optimizer
        self.stage, self.step = -1, 0
        self.enter_stage(0)
        acc.register_for_checkpointing(_CurrentSchedule(self))
        self.clock = Clock(Target.parse(train.target) if train.target else None,
                           train.stop_at_target)
        self._stop_signal: int | None = None
        self._claimed, self._lock, self._saved = False, None, None

    # ---- what subclasses override -------------------------------------------------------
    def train_step(self, batch) -> torch.Tensor:
        """Loss of one micro-batch (mean over its examples)."""
        inputs, targets = batch
        return F.cross_entropy(self.model(inputs), targets, label_smoothing=self.label_smoothing)

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

    def unwrapped(self) -> nn.Module:
        """The model without its strategy's wrapper."""
        return self.parallel.unwrapped()

    def epoch_at(self, step: int) -> float:
        return self.train_data.epoch_at(step)

    def print(self, *args) -> None:
        self.accelerator.print(*args)

    def enter_stage(self, index: int) -> None:
        """Set up stage ``index`` at its first step: a fresh optimizer state, the stage's
        hyperparameters in every group, its frozen layers and its 1cycle, which drives the
        torch optimizer that really steps (inside its strategy's wrapper, if any).

        A frozen layer group stops taking gradients and its BatchNorms are marked ``frozen``
        (:class:`~toolkit.models.FreezableSequential` keeps them in eval mode); a strategy
        that cannot stop a group's gradients steps it at lr 0 instead
        (:meth:`~toolkit.parallel.base.Strategy.freeze`)."""
        if index == self.stage:
            return
        stage, inner = self.stages[index], self.parallel.torch_optimizer()
        inner.state.clear()
        n = 1 + max(g for _, g in self._grouped)
        mults = stage.optim.lr_mults or (1.0,) * n
        trains = [stage.train_groups is None or g in stage.train_groups for g in range(n)]
        factors = self.parallel.freeze(self._grouped, trains)
        for group in inner.param_groups:
            stage.optim.write_hparams(group, mults[group["layer_group"]] *
                                      factors[group["layer_group"]])
        group_of = {id(p): g for p, g in self._grouped}
        for m in self.unwrapped().modules():
            if isinstance(m, _BatchNorm):
                own = [group_of[id(p)] for p in m.parameters(recurse=False) if id(p) in group_of]
                m.frozen = bool(own) and not any(trains[g] for g in own)
        start = self.stage_ends[index - 1] if index else 0
        self.scheduler = stage.schedule.build(inner, self.stage_ends[index] - start)
        self.stage = index

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
        """The means of :meth:`eval_step`'s sums over every rank's evaluation data, at a
        schedule-free optimizer's averaged weights (BatchNorm statistics recomputed for them
        from :data:`BN_BATCHES` training micro-batches of ``(inputs, ...)``)."""
        if self.eval_data is None:
            return {}
        sums: dict[str, torch.Tensor] = {}
        self.parallel.sync_buffers()
        with averaged_weights(self.parallel.torch_optimizer()) as averaged:
            if averaged:
                batches = itertools.islice(self.train_data.batches(self.step), BN_BATCHES)
                batchnorm.recompute_statistics(self.unwrapped(), (
                    send_to_device(b[0], self.accelerator.device) for b in batches))
            self.model.eval()
            for batch in self.eval_data.eval_batches():
                batch = send_to_device(batch, self.accelerator.device)
                for k, v in self.eval_step(batch).items():
                    sums[k] = sums.get(k, 0) + v.detach().double().cpu()
            self.model.train()
        return {f"valid_{k}": v for k, v in mean_of_sums(sums).items()}

    def lr_and_beta1(self) -> dict[str, float]:
        groups = self.scheduler.optimizer.param_groups
        key = "beta1" if "betas" in groups[0] else "momentum"
        return {"lr": max(float(g["lr"]) for g in groups), key: beta1_of(groups[0])}

    def log(self, row: dict) -> None:
        if self.is_main:
            self.folder.append_metrics(row)
        self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def fit(self) -> dict:
        """Train to the end or to a stop signal. Returns ``stopped`` (a signal stopped it,
        a checkpoint is saved), ``step``, ``checkpoint`` and, when finished, ``epochs``,
        ``wall_time_s`` and the last train and eval metrics."""
        cfg = self.train_cfg
        resume.start(self)
        self.clock.start()
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        started, self.metrics, it = time.time(), {}, self.train_data.batches(self.step)
        self._bar = tqdm(total=self.total_steps, initial=self.step, desc="train",
                         disable=not (self.is_main and cfg.progress), dynamic_ncols=True,
                         mininterval=0.1 if sys.stderr.isatty() else 10)
        self._logged = torch.zeros(2, dtype=torch.float64)
        self.model.train()
        try:
            while self.step < self.total_steps and not self.clock.stopped:
                schedule = {"stage": self.stage, **self.lr_and_beta1()}
                stop = self.train_one_step(it, schedule)
                if stop or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
                    path = resume.save(self)
                if stop:
                    self.print(f"received {stop}: saved {path} at step {self.step}/"
                               f"{self.total_steps}; resume with the same command and "
                               "--resume auto")
                    return {"stopped": True, "step": self.step, "checkpoint": str(path)}
        finally:
            self._bar.close()
            for s, h in previous.items():
                signal.signal(s, h)
        if self.eval_data is not None and not any(k.startswith("valid_") for k in self.metrics):
            self.metrics.update(self.evaluate())  # resumed at its end: no step, no evaluation
        path = resume.save(self)
        return {"stopped": False, "step": self.step, "epochs": round(self.epoch_at(self.step), 4),
                "wall_time_s": round(time.time() - started, 2), "checkpoint": str(path),
                **self.clock.result(), **self.metrics, **self.compiled()}

    def compiled(self) -> dict:
        """``compiled_graphs``: how many graphs torch.compile made in this process (with
        --compile): train and eval modes, a new shape, a stage freezing a group."""
        if not self.train_cfg.compile:
            return {}
        import torch._dynamo

        return {"compiled_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]}

    def train_one_step(self, it, schedule: dict) -> str | None:
        """One optimizer step, then its logging and evaluation when due; the name of a stop
        signal that some rank received, or None."""
        cfg, world = self.train_cfg, self.accelerator.num_processes
        loss = self.optimizer_step(it)
        self.step += 1
        self.enter_stage(stage_at(self.stage_ends, self.step))  # before this step's checkpoint
        # One small all-reduce per step: the global loss, and collective decisions on a
        # non-finite loss and on a stop signal (every rank must agree).
        flags = all_reduce_sum(torch.tensor(
            [loss.item(), float(not math.isfinite(loss.item())),
             float(self._stop_signal is not None)], dtype=torch.float64))
        if flags[1] > 0:
            raise UserError(f"non-finite loss ({loss.item()}) at step {self.step}: lower "
                            f"--optim.lr (now {schedule['lr']:.3g} at this step) or set --clip; "
                            "no checkpoint was written for this step")
        self._logged += torch.tensor([flags[0] / world, 1.0], dtype=torch.float64)
        self._bar.update(1)
        epoch, last = round(self.epoch_at(self.step), 4), self.step == self.total_steps
        if self.step % cfg.log_every == 0 or last:
            loss = self.metrics["train_loss"] = (self._logged[0] / self._logged[1]).item()
            self.log({"step": self.step, "epoch": epoch, **schedule, "train_loss": loss})
            self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{schedule['lr']:.3g}")
            self._logged.zero_()
        due = (self.step % cfg.eval_every == 0 if cfg.eval_every
               else self.epoch_at(self.step).is_integer())
        if (due or last) and (evaluated := self.evaluate()):
            self.metrics.update(evaluated)
            self.clock.check(evaluated, self.step, epoch)
            self.log({"step": self.step, "stage": schedule["stage"], "epoch": epoch, **evaluated,
                      "train_seconds": round(self.clock.now(), 2)})  # time to any target
            if self.is_main:
                self._bar.write(f"step {self.step}: " + " ".join(
                    f"{k} {v:.4f}" for k, v in evaluated.items()))
        if flags[2] == 0:
            return None
        return signal.Signals(self._stop_signal).name if self._stop_signal \
            else "a stop signal on another rank"

    def _on_signal(self, signum, frame) -> None:
        # Only a flag: I/O in a handler can deadlock mid-collective (Lightning #21406).
        self._stop_signal = signum

    def seed_rank(self) -> None:
        """Each rank's own dropout stream (the weights were seeded alike by the entry)."""
        torch.manual_seed(self.train_cfg.seed + 1_000_003 * self.accelerator.process_index)

    def lr_find(self, start_lr: float = 1e-7, end_lr: float = 10.0, num_steps: int = 100,
                smooth: float = 0.98, stop_div: float = 4.0) -> dict:
        """LR range test (:func:`toolkit.lr_finder.range_test`) through this trainer's own
        step; the trainer is left exactly as it was. Collective."""
        self.seed_rank()
        resume.claim(self)
        return lr_finder.range_test(self, start_lr, end_lr, num_steps, smooth, stop_div)

    def close(self) -> None:
        """End the run: finish trackers, leave the process group (no collectives after) and
        release the output folder."""
        self.accelerator.end_training()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
