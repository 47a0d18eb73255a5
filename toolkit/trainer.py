"""One small trainer over ``accelerate.Accelerator``.

The loop: forward, loss, backward, clip, optimizer step, 1cycle step, zero grad, with
gradient accumulation, bf16/fp16, evaluation, ``metrics.jsonl`` + TensorBoard, a progress
bar on the main process, atomic checkpoints and exact resume. Extend it by subclassing and
overriding :meth:`Trainer.train_step` (returns the loss of a micro-batch) and
:meth:`Trainer.eval_step` (returns sums to average over the evaluation set).

Why the schedule is not ``accelerator.prepare``d: a prepared scheduler steps
``num_processes`` times per optimizer step and mis-steps under accumulation (accelerate
#874, #963, #995). Why the data loader is not prepared either: the toolkit owns the data
order (:mod:`toolkit.sampler`) so that resume is exact mid-epoch (accelerate #2016).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType, send_to_device
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from toolkit import checkpoint, lifecycle, strategy
from toolkit.config import OptimConfig, ScheduleConfig, TrainConfig, write_json
from toolkit.distributed import all_reduce_sum, make_accelerator
from toolkit.errors import UserError
from toolkit.sampler import GlobalBatchSampler, ShardSampler
from toolkit.schedule import beta1_of

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def batches(dataset: Dataset, sampler):
    """Micro-batches of ``dataset`` in ``sampler``'s order (tensor datasets indexed at once)."""
    if isinstance(dataset, TensorDataset):
        for idx in sampler:
            yield tuple(t[idx] for t in dataset.tensors)
    else:
        yield from DataLoader(dataset, batch_sampler=sampler, num_workers=0)


class Trainer:
    """Train ``model`` on ``train_data`` with the optimizer and 1cycle of the configs.

    ``layer_groups`` (a list of modules) with ``optim.lr_mults`` gives discriminative
    learning rates. Build the model after seeding (``torch.manual_seed(train.seed)``) so
    every rank starts from the same weights.
    """

    def __init__(self, model: nn.Module, train_data: Dataset, eval_data: Dataset | None = None,
                 *, train: TrainConfig, optim: OptimConfig, schedule: ScheduleConfig,
                 config: dict | None = None, layer_groups: list[nn.Module] | None = None):
        self.cfg, self.config = train, config
        self.out = Path(train.output_dir)
        optim.check_layer_groups(len(layer_groups) if layer_groups else 1)
        if lifecycle.launched():
            lifecycle.exit_with_launcher()
        acc, self.strategy = make_accelerator(
            train.strategy, train.deepspeed_config, batch_size=train.batch_size,
            grad_accum=train.grad_accum, clip=train.clip, precision=train.precision,
            project_dir=self.out)
        self.accelerator = acc
        self.deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        world, rank = acc.num_processes, acc.process_index
        self.micro_batch = train.batch_size // (world * train.grad_accum)
        self.train_data, self.eval_data = train_data, eval_data
        self.sampler = self.eval_sampler = None
        if isinstance(train_data, Dataset):  # map-style: the toolkit's global-batch order
            self.sampler = GlobalBatchSampler(len(train_data), train.batch_size, world=world,
                                              rank=rank, accum=train.grad_accum, seed=train.seed)
        if isinstance(eval_data, Dataset):
            if len(eval_data) < world:
                raise UserError(f"the evaluation set has {len(eval_data)} examples for {world} "
                                "processes; it needs at least one per process")
            self.eval_sampler = ShardSampler(len(eval_data), self.micro_batch * train.grad_accum,
                                             world=world, rank=rank)
        self.total_steps = self.count_steps()
        if train.max_steps is not None:
            self.total_steps = min(self.total_steps, train.max_steps)
        optimizer = optim.build(model, layer_groups)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        checkpoint.any_world(self.model)
        # The schedule drives the torch optimizer that really steps (inside DeepSpeed's
        # ZeRO wrapper, if any), once per optimizer step.
        self.scheduler = schedule.build(strategy.torch_optimizer(self.optimizer),
                                        self.total_steps)
        acc.register_for_checkpointing(self.scheduler)
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

    # ---- data position: override all three for data that is not a map-style dataset ----
    def count_steps(self) -> int:
        """Optimizer steps in ``epochs`` epochs (before ``max_steps``)."""
        return self.cfg.epochs * self.sampler.steps_per_epoch

    def epoch_at(self, step: int) -> float:
        """Epochs done after ``step`` optimizer steps (whole at epoch ends)."""
        return step / self.sampler.steps_per_epoch

    def train_batches(self):
        """This rank's micro-batches from the current step on, across epochs, forever."""
        epoch, k = divmod(self.step, self.sampler.steps_per_epoch)
        while True:
            self.sampler.set_position(epoch, k)
            yield from batches(self.train_data, self.sampler)
            epoch, k = epoch + 1, 0

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

    def print(self, *args) -> None:
        self.accelerator.print(*args)

    def optimizer_step(self, it, step_schedule: bool = True) -> torch.Tensor:
        """Accumulate ``grad_accum`` micro-batches from ``it``, clip, step; mean loss."""
        acc, accum = self.accelerator, self.cfg.grad_accum
        total = torch.zeros((), device=acc.device)
        for a in range(accum):
            batch = send_to_device(next(it), acc.device)
            last = a == accum - 1
            if self.deepspeed:
                # The engine divides by its gradient_accumulation_steps (= grad_accum),
                # reduces at the boundary, clips (its gradient_clipping) and steps there.
                loss = self.train_step(batch)
                self.model.set_gradient_accumulation_boundary(last)
                self.model.backward(loss)
                if last:
                    self.model.step()
            else:
                # Gradients are all-reduced only on the last micro-batch of the step.
                with contextlib.nullcontext() if last else acc.no_sync(self.model):
                    loss = self.train_step(batch)
                    acc.backward(loss / accum)
            total += loss.detach().float()
        if not self.deepspeed:
            if self.cfg.clip is not None:
                acc.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if step_schedule:
            self.scheduler.step()
        return total / accum

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.eval_data is None:
            return {}
        self.model.eval()
        sums: dict[str, torch.Tensor] = {}
        for batch in batches(self.eval_data, self.eval_sampler):
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
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
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
                self._lock = lifecycle.claim(self.out)
            except UserError as e:
                error = e
        if all_reduce_sum(torch.tensor([float(error is not None)])).item() > 0:
            raise error or UserError(f"--output-dir {self.out} is in use by another run")
        self._claimed = True

    def start(self) -> None:
        """Check and claim the output folder, resume if asked, write config.json, open
        trackers."""
        ckpt_dir = self.out / "checkpoints"
        checkpoint.candidates(self.cfg.resume, ckpt_dir)  # a bad --resume path: before any write
        if self.cfg.resume is None and (checkpoint.list_checkpoints(ckpt_dir)
                                        or (self.out / "metrics.jsonl").exists()):
            raise UserError(f"--output-dir {self.out} already holds a run; pass --resume auto "
                            "to continue it, or choose another --output-dir")
        self.claim_output_dir()
        resume = checkpoint.resume_point(self.accelerator, self.cfg.resume, ckpt_dir)
        if self.is_main and self.config is not None and resume is None:
            write_json(self.out / "config.json", self.config)
        self.accelerator.wait_for_everyone()
        if resume is not None:
            state = checkpoint.load(self.accelerator, resume)
            self.step = state["step"]
            self._saved = (self.step, resume)  # no second save of the same step
            self.load_extra_state(state.get("extra", {}))
            if state["total_steps"] != self.total_steps:
                raise UserError(f"checkpoint {resume} belongs to a run of "
                                f"{state['total_steps']} steps, this one has {self.total_steps}: "
                                "resume with the same --epochs/--max-steps/--batch-size")
            self.print(f"resumed from {resume} at step {self.step}/{self.total_steps}")
        self.accelerator.init_trackers("tensorboard")
        acc, opt = self.accelerator, self.scheduler.optimizer
        self.print(f"training {self.total_steps} steps ({self.epochs_str()}) on "
                   f"{acc.num_processes} process(es), {acc.distributed_type.value} "
                   f"({self.strategy}), "
                   f"{acc.device}, {self.cfg.precision}; global batch {self.cfg.batch_size} = "
                   f"{acc.num_processes} x {self.cfg.grad_accum} x {self.micro_batch}; "
                   f"optimizer {type(opt).__name__} ({getattr(opt, 'impl', '?')}"
                   f"{', amsgrad' if opt.defaults.get('amsgrad') else ''})")

    def save(self) -> Path:
        if self._saved is None or self._saved[0] != self.step:  # not twice at one step
            path = checkpoint.save(self.accelerator, self.out / "checkpoints", self.step,
                                   {"step": self.step, "total_steps": self.total_steps,
                                    "extra": self.extra_state()},
                                   self.cfg.keep_checkpoints)
            self._saved = (self.step, path)
        return self._saved[1]

    def epochs_str(self) -> str:
        return f"{self.epoch_at(self.total_steps):.3g} epochs"

    def fit(self) -> dict:
        """Train to the end (or to a stop signal); return the final metrics."""
        cfg, acc = self.cfg, self.accelerator
        self.start()
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        started = time.time()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (self.is_main
                   and cfg.progress), dynamic_ncols=True, desc="train",
                   mininterval=0.1 if sys.stderr.isatty() else 10)
        it = self.train_batches()
        logged, metrics = torch.zeros(2, dtype=torch.float64), {}
        self.model.train()
        try:
            while self.step < self.total_steps:
                schedule = self.lr_and_beta1()
                loss = self.optimizer_step(it)
                self.step += 1
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
                        self.log({"step": self.step,
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
                    return {"stopped": True, "step": self.step}
        finally:
            bar.close()
            for s, h in previous.items():
                signal.signal(s, h)
        path = self.save()
        results = {"step": self.step, "epochs": round(self.epoch_at(self.step), 4),
                   "wall_time_s": round(time.time() - started, 2), "checkpoint": str(path),
                   **metrics}
        if self.is_main:
            write_json(self.out / "results.json", results)
        for tracker in acc.trackers:
            tracker.finish()
        return results

    def close(self) -> None:
        """End the run: finish trackers, leave the process group (no collectives after) and
        release the output folder."""
        self.accelerator.end_training()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
