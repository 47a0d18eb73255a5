"""Parallel strategies by name: one process or DDP, DeepSpeed ZeRO 1/2/3 (+ CPU offload).

:data:`Strategy` is the ``--strategy`` flag: ``auto`` (what the launcher set up) or one of
:data:`Concrete`, the strategies a run really has; a run of one process is ``ddp`` at world
1 (DDP's arithmetic: each process holds everything). :func:`resolve` picks the one to run;
everything DeepSpeed-specific (its generated config, the launcher's DeepSpeed settings, its
environment and checkpoints) is :mod:`toolkit.zero`'s.

Under any strategy, :func:`torch_optimizer` is the torch optimizer that really steps, inside
Accelerate's and DeepSpeed's wrappers.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from toolkit import zero
from toolkit.errors import UserError

Concrete = Literal["ddp", "zero1", "zero2", "zero3", "zero2-offload", "zero3-offload"]
Strategy = Literal["auto", Concrete]
CONCRETE: tuple[str, ...] = get_args(Concrete)
STRATEGIES: tuple[str, ...] = get_args(Strategy)


def parse_strategy(name: str) -> tuple[int, bool]:
    """``(zero stage, offload)``; stage 0 means no DeepSpeed (one process or DDP)."""
    if name not in STRATEGIES:
        raise UserError(f"--strategy {name!r} is unknown; choose one of {', '.join(STRATEGIES)}")
    if not name.startswith("zero"):
        return 0, False
    stage, offload = int(name[4]), name.endswith("-offload")
    return stage, offload


def strategy_name(stage: int, offload: bool) -> str:
    return "ddp" if stage == 0 else f"zero{stage}" + ("-offload" if offload else "")


def resolve(flag: str, user_json: str | None) -> tuple[str, dict | None]:
    """The strategy to run and the user's DeepSpeed JSON: the flag, or the launcher's; both
    given must agree."""
    parse_strategy(flag)
    launched = zero.from_launcher()
    user = None if launched is None else launched[2]
    if user_json is not None:
        user = zero.load_json(user_json)
    if launched is None:
        return ("ddp" if flag == "auto" else flag), user
    name = strategy_name(*launched[:2])
    if flag not in ("auto", name):
        raise UserError(f"--strategy {flag} contradicts the launcher's DeepSpeed config "
                        f"({name}); drop one of them")
    return name, user


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
                totals[key] = totals.get(key, 0) + value.numel() * value.element_size()
    return totals


def full_state_dict(accelerator, model) -> dict[str, torch.Tensor]:
    """The whole model's parameters on CPU, gathered from ZeRO-3 shards if need be."""
    unwrapped = accelerator.unwrap_model(model)
    with zero.gathered(model, unwrapped.parameters()):
        return {k: v.detach().cpu().clone() for k, v in unwrapped.state_dict().items()}
