"""One process, or data parallel over N (torch's DDP through Accelerate): every process
holds the whole model, its gradients and its optimizer states in fp32.

Accelerate 1.15 on a machine without GPU gives every process launched by ``torchrun`` or
``accelerate launch --multi_gpu`` a world of one and trains N independent models without a
word; ``ACCELERATE_USE_CPU=true`` before ``Accelerator()`` makes it ``MULTI_CPU`` over gloo
(:func:`toolkit.distributed.check_world_size` then checks the world really is N).
"""

from __future__ import annotations

import contextlib
import os

import torch
from accelerate.utils import DistributedDataParallelKwargs

from toolkit.parallel.base import Estimate, Strategy, empty_estimate


class DDP(Strategy):
    """Accelerate's DDP (a world of one: no wrapper); bf16/fp16 is Accelerate's autocast."""

    def prepare_env(self, world: int) -> None:
        if not torch.cuda.is_available() and world > 1:
            os.environ.setdefault("ACCELERATE_USE_CPU", "true")

    def accelerator_kwargs(self, *, freezes: bool, **_) -> dict:
        # Layers frozen for a stage: DDP must not wait for their gradients.
        return {"kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=True)]
                if freezes else []}

    def prepare(self, accelerator, model, build_optimizer) -> None:
        self.accelerator = accelerator
        self.model, self.optimizer = accelerator.prepare(model, build_optimizer(model))

    def forward_backward(self, loss_of, last):
        acc = self.accelerator
        # DDP decides in the forward whether the backward all-reduces: both go inside.
        with contextlib.nullcontext() if last else acc.no_sync(self.model):
            loss = loss_of()
            acc.backward(loss / self.grad_accum)
        return loss

    def step(self, clip):
        if clip is not None:
            self.accelerator.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @classmethod
    def memory(cls, name, n_params, world, precision, states) -> Estimate:
        # Every process holds everything, in fp32 (autocast only touches activations).
        out = empty_estimate()
        out["device.params"] = out["device.grads"] = 4 * n_params
        for s in states:
            out[f"device.{s}"] = 4 * n_params
        return out
