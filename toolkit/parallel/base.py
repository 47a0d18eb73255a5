"""What every parallel strategy does, and the arithmetic they share.

A :class:`Strategy` owns all that differs between one process or DDP, DeepSpeed ZeRO and
FSDP2: the environment and ``Accelerator()`` arguments it needs, wrapping the model and
its optimizer, one micro-batch's forward and backward, the clipped optimizer step, how a
frozen layer group is frozen, the model that scores, its checkpoint files, the full
weights for ``model.safetensors`` and its row of ``toolkit memory``. The trainer calls
these and never asks which strategy runs (torchtitan's ``forward_backward_step`` and
``ParallelDims`` draw the same line).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

Estimate = dict[str, int]
STATES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")
"""The names torch gives each optimizer state, so estimates compare key by key with
:meth:`Strategy.optimizer_state_bytes`."""
CATEGORIES = ("params", "grads", "master_params", *STATES)
PLACES = ("device", "cpu")


def torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's and DeepSpeed's wrappers: the one that steps."""
    # Accelerate's wrapper is itself a torch Optimizer; torch's own have no `.optimizer`.
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_state_bytes(optimizer) -> dict[str, int]:
    """Bytes of each optimizer state (``exp_avg``, ``exp_avg_sq``, ...) this rank holds."""
    totals: dict[str, int] = {}
    for state in torch_optimizer(optimizer).state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and value.ndim > 0:
                local = getattr(value, "_local_tensor", value)  # a DTensor: this rank's shard
                totals[key] = totals.get(key, 0) + local.numel() * local.element_size()
    return totals


def empty_estimate() -> Estimate:
    return {f"{place}.{c}": 0 for place in PLACES for c in CATEGORIES}


class Strategy:
    """One way to spread the training step over processes. A subclass is one module; its
    names go into :data:`toolkit.parallel.STRATEGIES`."""

    layout = "ddp"
    """What its checkpoints hold: a checkpoint resumes only under a strategy of the same
    layout (ZeRO-2 and ZeRO-2 with offload share one)."""

    def __init__(self, name: str, user_config: dict | None = None):
        self.name, self.user_config = name, user_config
        self.accelerator = self.model = self.optimizer = None
        self.grad_accum = 1

    # ---- before Accelerator() -----------------------------------------------------------
    def prepare_env(self, world: int) -> None:
        """Environment the strategy needs before ``Accelerator()`` is built."""

    def accelerator_kwargs(self, *, micro_batch: int, grad_accum: int, world: int,
                           clip: float | None, precision: str, freezes: bool) -> dict:
        """``Accelerator()``'s ``deepspeed_plugin`` and ``kwargs_handlers``."""
        return {"kwargs_handlers": []}

    def check(self, *, precision: str, clip: float | None, freezes: bool,
              device: torch.device) -> None:
        """A one-line :class:`~toolkit.errors.UserError` for what the strategy cannot run
        (``freezes``: a stage trains only some layer groups)."""

    # ---- the model ------------------------------------------------------------------------
    def compile(self, model: nn.Module, mode: str) -> None:
        """``torch.compile`` ``model``'s forward in place, before :meth:`prepare` wraps it:
        its parameters and state_dict keys stay the model's."""
        model.compile(mode=mode)

    def prepare(self, accelerator, model: nn.Module,
                build_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> None:
        """Wrap ``model`` and the optimizer ``build_optimizer(model)`` makes of it."""
        raise NotImplementedError

    def forward_backward(self, loss_of: Callable[[], torch.Tensor], last: bool) -> torch.Tensor:
        """One micro-batch: ``loss_of()`` (its forward and mean loss) and its backward,
        the gradients reduced over ranks on the ``last`` micro-batch of the step only."""
        raise NotImplementedError

    def step(self, clip: float | None) -> None:
        """Clip the gradient norm to ``clip`` (None: no clipping), step, zero the gradients."""
        raise NotImplementedError

    def freeze(self, grouped: list[tuple[nn.Parameter, int]], trains: list[bool]) -> list[float]:
        """Freeze the layer groups ``g`` with ``not trains[g]``; the factor of each group's lr
        (1: its own; 0: a group the strategy cannot stop computing gradients for)."""
        for p, g in grouped:
            p.requires_grad_(trains[g])
        return [1.0] * len(trains)

    def sync_buffers(self) -> None:
        """Make every rank's buffers (BatchNorm's running statistics) rank 0's before they
        are used or saved (DDP does it at each forward itself)."""

    def unwrapped(self) -> nn.Module:
        """The model without its wrapper (the same parameters): DDP's ``module``. Not
        accelerate's ``unwrap_model``, which imports DeepSpeed to look for its engine: a
        second of every start that does not use it."""
        model = self.model
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    def scoring_model(self) -> nn.Module:
        """The model to score with outside the training step (no gradient bookkeeping)."""
        return self.unwrapped()

    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer that really steps (the 1cycle drives its groups)."""
        return torch_optimizer(self.optimizer)

    # ---- checkpoints and weights ----------------------------------------------------------
    def save(self, folder: Path) -> None:
        """Write this rank's model, optimizer, scheduler, scaler and RNG state; collective."""
        self.accelerator.save_state(str(folder), safe_serialization=True)

    def load(self, folder: Path) -> None:
        """Restore what :meth:`save` wrote, also from another number of processes."""
        self.accelerator.load_state(str(folder))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's parameters and buffers on CPU (on the main process at least);
        collective."""
        return {k: v.detach().cpu().clone() for k, v in self.unwrapped().state_dict().items()}

    @staticmethod
    def checkpoint_weights(folder: Path) -> dict[str, torch.Tensor] | None:
        """The full weights in a checkpoint folder of this layout, read in one process."""
        from accelerate.utils import SAFE_WEIGHTS_NAME
        from safetensors.torch import load_file

        weights = folder / SAFE_WEIGHTS_NAME  # Accelerate's file in a checkpoint
        return load_file(weights) if weights.is_file() else None

    def hard_exit(self) -> bool:
        """Whether to leave the process without the interpreter's teardown
        (:func:`toolkit.lifecycle.exit_process`): once a process group ran (gloo's threads
        abort it now and then)."""
        return self.accelerator is not None and self.accelerator.num_processes > 1

    # ---- toolkit memory -------------------------------------------------------------------
    @classmethod
    def memory(cls, name: str, n_params: int, world: int, precision: str,
               states: tuple[str, ...]) -> Estimate:
        """Bytes of the model states one process holds, by place and category."""
        raise NotImplementedError
