"""A tiny recipe for the tests: an MLP with dropout on a synthetic set whose examples carry
their index, so each rank can report what it saw. Launched by the tests as a real program
(``python``, ``torchrun``, ``accelerate launch``) exactly like a recipe.

    python tests/tiny.py --output-dir /tmp/t --dump /tmp/t/dump
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from toolkit import lifecycle, parallel, recipe
from toolkit.cli import run
from toolkit.config import OptimConfig, ScheduleConfig, Train, TrainConfig, parse, to_dict
from toolkit.data.source import DeviceTensors, Loader
from toolkit.schedule import beta1_of
from toolkit.trainer import Trainer


@dataclass
class Config:
    train: Train = field(default_factory=lambda: TrainConfig(
        output_dir="runs/tiny", epochs=2, batch_size=32, log_every=1, progress=False))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-2, wd=0.1))
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    examples: int = 320
    """Training examples (the eval set has a quarter as many)."""
    dropout: float = 0.0
    """Dropout after the hidden layer (exercises the RNG on resume)."""
    dump: str | None = None
    """Write per-rank indices, lr/beta1 per step and final parameters to DUMP.rankN.pt."""
    overflow_at: int = 0
    """Make the gradients of optimizer step N infinite (an fp16 overflow; the loss stays
    finite), for the loss scaler's tests."""
    step_sleep: float = 0.0
    """Seconds to sleep after each optimizer step (so a test can kill it mid-run)."""
    then_fit: bool = False
    """With --lr-find: train afterwards in the same process (the finder must leave no trace)."""
    data: Literal["tensors", "loader"] = "tensors"
    """tensors: DeviceTensors; loader: a map-style dataset through a DataLoader."""
    workers: int = 0
    """DataLoader workers (with --data loader)."""
    batchnorm: bool = False
    """A BatchNorm1d after the first layer (which then has no bias); the mean and unbiased
    variance of its input in each training forward go to the dump as ``bn_batches``."""


def model(dropout: float, batchnorm: bool = False) -> nn.Module:
    if not batchnorm:
        return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(dropout), nn.Linear(64, 4))
    # No bias before BatchNorm (as in ResNets): BatchNorm subtracts it again, so its gradient
    # is round-off, which Adam scales up to full steps that no two summation orders share.
    return nn.Sequential(nn.Linear(16, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(),
                         nn.Dropout(dropout), nn.Linear(64, 4))


def record_batch_stats(layer: nn.Module, out: list) -> None:
    """Append (mean, unbiased var) of each training output of ``layer`` to ``out`` (on the
    layer before the BatchNorm, which --sync-batchnorm replaces)."""
    def hook(module, args, output):
        if module.training:
            x = output.detach().double()
            out.append((x.mean(0), x.var(0)))
    layer.register_forward_hook(hook)


def dataset(n: int, seed: int, kind: str = "tensors", workers: int = 0, shuffle_seed=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 1).long()) % 4
    order = dict(shuffle=shuffle_seed is not None, seed=shuffle_seed or 0)
    if kind == "loader":
        return Loader(TensorDataset(x, y, torch.arange(n)), num_workers=workers, **order)
    return DeviceTensors(x, y, torch.arange(n), **order)


class TinyTrainer(Trainer):
    seen: list[list[int]]

    def train_step(self, batch):
        x, y, idx = batch
        self.seen.append(idx.tolist())
        out = self.model(x)
        if self.step + 1 == self.overflow_at:
            out.register_hook(lambda g: torch.full_like(g, float("inf")))
        return F.cross_entropy(out, y)

    def eval_step(self, batch):
        return super().eval_step(batch[:2])

    def optimizer_step(self, it, step_schedule=True):
        # Read from the optimizer that really steps: inside the DeepSpeed engine, if any.
        inner = self.parallel.torch_optimizer()
        group = inner.param_groups[0]
        self.schedule_seen.append({"lr": float(group["lr"]), "beta1": beta1_of(group)})
        loss = super().optimizer_step(it, step_schedule)
        if self.sleep:
            time.sleep(self.sleep)
        return loss


def main() -> None:
    cfg = parse({"default": Config})
    if lifecycle.launched():
        lifecycle.exit_with_launcher()
    torch.manual_seed(cfg.train.seed)
    data = dict(kind=cfg.data, workers=cfg.workers)
    net, bn_batches = model(cfg.dropout, cfg.batchnorm), []
    if cfg.batchnorm:
        record_batch_stats(net[0], bn_batches)
    trainer = TinyTrainer(net, dataset(cfg.examples, 1, **data, shuffle_seed=cfg.train.seed),
                          dataset(cfg.examples // 4, 2, **data), train=cfg.train,
                          optim=cfg.optim, schedule=cfg.schedule, recipe_config=to_dict(cfg))
    trainer.seen, trainer.schedule_seen, trainer.sleep = [], [], cfg.step_sleep
    trainer.overflow_at = cfg.overflow_at
    out = {}
    if cfg.train.lr_find:
        result = trainer.lr_find(num_steps=60)
        out = {"steps": len(result["lrs"]), "suggestions": result["suggestions"],
               "optimizer_state": len(trainer.optimizer.state), "rng": torch.get_rng_state()}
        trainer.seen, trainer.schedule_seen = [], []
    if not cfg.train.lr_find or cfg.then_fit:
        out.update(trainer.fit())
        if not out["stopped"]:
            recipe.write_results(trainer, {k: v for k, v in out.items() if k != "stopped"})
    if cfg.dump:
        acc = trainer.accelerator
        torch.save({"world": acc.num_processes, "rank": acc.process_index,
                    "distributed_type": str(acc.distributed_type), "seen": trainer.seen,
                    "schedule": trainer.schedule_seen, "result": out,
                    "optimizer_bytes": parallel.optimizer_state_bytes(trainer.optimizer),
                    "params": trainer.parallel.full_state_dict(),
                    "bn_batches": bn_batches},
                   f"{cfg.dump}.rank{acc.process_index}.pt")
    trainer.close()
    out.pop("rng", None)
    print("RESULT " + json.dumps({"rank": int(os.environ.get("RANK", 0)), **out}), flush=True)
    code = recipe.STOPPED if out.get("stopped") else recipe.FINISHED
    if trainer.parallel.hard_exit():
        lifecycle.exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    run(main)
