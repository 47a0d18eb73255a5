"""BatchNorm statistics over all processes, so that N processes normalize like one.

Without it, BatchNorm breaks "N processes equal one": each rank normalizes its own
micro-batch (global batch / N examples), so the loss, the gradients and the running
statistics are those of smaller batches. DDP then averages the gradients, so the weights
equal those of one process accumulating the N micro-batches (``--grad-accum N``), and it
broadcasts the buffers from rank 0 before each forward, so the running statistics are
rank 0's micro-batches' alone.

:func:`sync_batchnorm` replaces every ``nn.BatchNorm1d/2d/3d``: each training forward then
uses the mean and biased variance of the micro-batches of all ranks together, and the
running statistics are updated with the unbiased variance of that union, so N processes
normalize like one process on the union: with one optimizer step per global batch
(``grad_accum = 1``), weights and running statistics equal those of one process on the
global batch. Gradient accumulation still splits BatchNorm's batch: with ``grad_accum = k``
each forward normalizes ``global batch / k`` examples, and the run equals one process with
``--grad-accum k``.

Under NCCL the replacement is torch's ``nn.SyncBatchNorm`` (fused CUDA kernels). Elsewhere it
is :class:`AllReduceBatchNorm`, because torch's raises "SyncBatchNorm expected input tensor
to be on GPU or XPU or privateuseone" on CPU, where the gloo runs and the tests live. Both
keep the BatchNorm's own ``Parameter`` and buffer objects, so an optimizer or layer groups
built from the original model still refer to the converted one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

_CONVERTIBLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@torch.no_grad()
def recompute_statistics(model: nn.Module, inputs: Iterable[torch.Tensor]) -> bool:
    """Every BatchNorm's running statistics recomputed from scratch as the plain mean over
    the batches ``inputs`` in training mode (torch's ``swa_utils.update_bn``; what
    schedule-free training documents for its averaged weights); the RNG is left as it was.
    False when the model has no BatchNorm (nothing to do)."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return False
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
    was_training = model.training
    model.train()
    with torch.random.fork_rng(devices=[]):
        for x in inputs:
            model(x)
    model.train(was_training)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return True


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks; the gradient of each rank's input is the sum of the ranks'
    output gradients (what ``torch.distributed.nn.functional.all_reduce`` computes, without
    its deprecation warning in torch 2.14)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllReduceSum.apply(grad, ctx.group), None


def _world(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class AllReduceBatchNorm(_BatchNorm):
    """BatchNorm over the micro-batches of all ranks, on any device the process group can
    all-reduce (CPU with gloo included).

    Training forward: per channel, the count and sum are all-reduced (float64), then the sum
    of squared deviations from that global mean (two passes, so a mean large against the
    spread loses no precision, unlike ``E[x^2] - E[x]^2`` in float32); both all-reduces are
    differentiable, so the gradients are those of BatchNorm on the union, as with
    ``nn.SyncBatchNorm``. Ranks may hold different numbers of examples. In eval mode, in a
    world of one or without a process group it is ``nn.BatchNorm`` exactly.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm, process_group=None) -> AllReduceBatchNorm:
        """``bn`` as an ``AllReduceBatchNorm`` holding the same Parameters and buffers."""
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                  process_group, device="meta")
        for name in ("weight", "bias"):
            setattr(new, name, getattr(bn, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(new, name, getattr(bn, name))
        if hasattr(bn, "qconfig"):
            new.qconfig = bn.qconfig
        return new.train(bn.training)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        group = self.process_group or dist.group.WORLD
        if not self.training or _world(group) == 1:
            return super().forward(input)
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        shape = [1, channels] + [1] * (input.dim() - 2)
        dtype = torch.promote_types(input.dtype, torch.float32)
        local = torch.cat([input.sum(dims, dtype=torch.float64),
                           input.new_full((1,), input.numel() // channels, dtype=torch.float64)])
        total = _AllReduceSum.apply(local, group)
        count = total[-1].item()
        if count <= 1:
            raise ValueError(f"expected more than 1 value per channel over all processes "
                             f"when training, got input size {list(input.shape)}")
        mean = total[:-1] / count
        # Centered in float64: a float32 mean would be off by half its ulp, which for a mean
        # large against the spread (1e4 against 1: 5e-4 of a standard deviation) shows.
        centered = (input.to(torch.float64) - mean.view(shape)).to(dtype)
        var = _AllReduceSum.apply(centered.square().sum(dims, dtype=torch.float64), group) / count
        scale = torch.rsqrt(var + self.eps).to(dtype)
        if self.weight is not None:
            scale = scale * self.weight.to(dtype)
        out = centered * scale.view(shape)
        if self.bias is not None:
            out = out + self.bias.to(dtype).view(shape)
        if self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(mean.detach(), var.detach() * (count / (count - 1)))
        return out.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        # nn.BatchNorm's rule: momentum, or a cumulative average when momentum is None.
        self.num_batches_tracked.add_(1)
        factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                  else self.momentum)
        for running, value in ((self.running_mean, mean), (self.running_var, unbiased_var)):
            running.mul_(1 - factor).add_(value.to(running.dtype), alpha=factor)


def sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """``model`` with every BatchNorm synchronized over ``process_group`` (default: all
    processes): ``nn.SyncBatchNorm`` when the process group runs NCCL, else
    :class:`AllReduceBatchNorm`. Parameters and buffers are the same objects as before (hooks
    on a BatchNorm are not carried over, as with torch's ``convert_sync_batchnorm``); returns
    the model (a new module if ``model`` itself is a BatchNorm)."""
    if (dist.is_available() and dist.is_initialized()
            and dist.get_backend(process_group) == "nccl"):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    return _convert(model, process_group, {})


def _convert(module: nn.Module, group, done: dict[int, nn.Module]) -> nn.Module:
    if id(module) in done:  # a BatchNorm shared by two parents stays shared
        return done[id(module)]
    if isinstance(module, LazyModuleMixin) and isinstance(module, _BatchNorm):
        raise ValueError(f"{type(module).__name__} has no shape yet: run one forward pass "
                         "before synchronizing BatchNorm")
    if isinstance(module, _CONVERTIBLE):
        new = AllReduceBatchNorm.from_batchnorm(module, group)
    else:
        new = module
        for name, child in module.named_children():
            converted = _convert(child, group, done)
            if converted is not child:
                setattr(module, name, converted)
    done[id(module)] = new
    return new
