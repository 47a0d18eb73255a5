"""1cycle: the learning rate goes up then down while beta1 (or momentum) goes the other way.

One pure function, :func:`one_cycle`, defines the shape from the training progress in
[0, 1]; the scheduler, the plots and the LR finder all use it. Shapes, after the post
(Gugger & Howard, 2018) and fastai 0.7's ``CircularLR_beta`` / ``TrainingPhase``:

* 3 phases (``phases=None``): linear ``max_lr/div -> max_lr`` over ``(1-pct)/2`` of the
  budget, linear back to ``max_lr/div`` over the next ``(1-pct)/2``, then the final ``pct``
  anneals to ``max_lr * final_frac`` (default ``1/(100*div)``), linearly (``lin_end``) or by
  cosine. beta1 goes ``moms[0] -> moms[1] -> moms[0]`` and stays at ``moms[0]`` while
  annealing.
* 4 phases (``phases=(up, plateau, down, anneal)`` in any unit, the post's language models
  used ``(7.5, 37.5, 37.5, 7.5)`` epochs): linear up, flat at ``max_lr``, linear down to
  ``max_lr/div``, then the anneal as above; beta1 down, flat at ``moms[1]``, up, flat.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.optim.lr_scheduler import LRScheduler


def _interp(start: float, end: float, t: float, cosine: bool) -> float:
    if cosine:
        return end + (start - end) * (1 + math.cos(math.pi * t)) / 2
    return start + (end - start) * t


def check_one_cycle(div: float, pct: float, phases: Sequence[float] | None,
                    moms: Sequence[float], final_frac: float | None) -> None:
    """Raise a one-line ``ValueError`` naming the first bad value and what is allowed."""
    if not div > 0:
        raise ValueError(f"div={div} must be > 0")
    if phases is None and not 0 < pct < 1:
        raise ValueError(f"pct={pct} must be in (0, 1)")
    if phases is not None and (len(phases) != 4 or min(phases) < 0 or sum(phases) <= 0):
        raise ValueError(f"phases={tuple(phases)} must be 4 non-negative lengths "
                         "(up, plateau, down, anneal) with a positive sum")
    if len(moms) != 2 or not all(0 <= m < 1 for m in moms):
        raise ValueError(f"moms={tuple(moms)} must be two values in [0, 1)")
    if final_frac is not None and not 0 <= final_frac <= 1:
        raise ValueError(f"final_frac={final_frac} must be in [0, 1]")


def one_cycle(
    progress: float,
    *,
    div: float = 10.0,
    pct: float = 0.1,
    phases: Sequence[float] | None = None,
    moms: Sequence[float] = (0.95, 0.85),
    lin_end: bool = True,
    final_frac: float | None = None,
) -> tuple[float, float]:
    """``(lr / max_lr, beta1)`` at ``progress`` in [0, 1] (clamped).

    Defaults are the post's CIFAR-10 run: ``div=10``, ``pct=0.1`` (its 13.68% in some
    runs), ``moms=(0.95, 0.85)``, linear end to ``max_lr/(100*div)``.
    """
    end = 1 / (100 * div) if final_frac is None else final_frac
    if phases is None:
        half = (1 - pct) / 2
        shares = (half, 0.0, half, pct)
    else:
        total = sum(phases)
        shares = tuple(p / total for p in phases)
    m0, m1 = moms
    plan = (  # (lr from, lr to, beta1 from, beta1 to, cosine)
        (1 / div, 1.0, m0, m1, False),
        (1.0, 1.0, m1, m1, False),
        (1.0, 1 / div, m1, m0, False),
        (1 / div, end, m0, m0, not lin_end),
    )
    x = min(max(progress, 0.0), 1.0)
    start = 0.0
    for i, (share, (lr0, lr1, b0, b1, cos)) in enumerate(zip(shares, plan)):
        if x < start + share or i == 3:
            t = min((x - start) / share, 1.0) if share > 0 else 1.0
            return _interp(lr0, lr1, t, cos), _interp(b0, b1, t, False)
        start += share
    raise AssertionError("unreachable")


class OneCycle(LRScheduler):
    """1cycle as a torch scheduler: call ``step()`` once per *optimizer* step.

    Writes ``lr`` (each group's initial lr times :func:`one_cycle`, so discriminative
    learning rates keep their ratios) and ``betas[0]`` or ``momentum`` into every param
    group of the optimizer it is given, DeepSpeed's wrapper included. Tensor-valued lr and
    betas (the compiled step) are updated in place. Its ``state_dict`` holds the step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, *,
                 div: float = 10.0, pct: float = 0.1, phases: Sequence[float] | None = None,
                 moms: Sequence[float] = (0.95, 0.85), lin_end: bool = True,
                 final_frac: float | None = None, cycle_momentum: bool = True,
                 last_epoch: int = -1):
        if total_steps < 1:
            raise ValueError(f"total_steps={total_steps} must be >= 1")
        check_one_cycle(div, pct, phases, moms, final_frac)
        self.total_steps = total_steps
        self.shape = dict(div=div, pct=pct, phases=None if phases is None else tuple(phases),
                          moms=tuple(moms), lin_end=lin_end, final_frac=final_frac)
        self.cycle_momentum = cycle_momentum
        super().__init__(optimizer, last_epoch)

    def values(self, step: int) -> tuple[float, float]:
        """``(lr factor, beta1)`` before optimizer step ``step`` (0-based)."""
        return one_cycle(step / self.total_steps, **self.shape)

    def get_lr(self) -> list[float]:
        factor, _ = self.values(self.last_epoch)
        return [base * factor for base in self.base_lrs]

    def step(self, epoch: None = None) -> None:
        super().step()
        self._write_beta1()

    def scale_current(self, factor: float) -> None:
        """Scale the lr of the optimizer step about to be taken by ``factor`` (salesforce
        AWD-LSTM's ``seq_len / bptt``); the next :meth:`step` writes the schedule's own value."""
        for group, lr in zip(self.optimizer.param_groups, self.get_last_lr()):
            set_lr(group, lr * factor)

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the step and write its lr and beta1 into the optimizer: the schedule is
        a function of the step, whatever state the optimizer's groups were loaded with."""
        super().load_state_dict(state_dict)
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            set_lr(group, lr)
        self._last_lr = lrs
        self._write_beta1()

    def _write_beta1(self) -> None:
        if self.cycle_momentum:
            _, mom = self.values(self.last_epoch)
            for group in self.optimizer.param_groups:
                set_beta1(group, mom)


def set_lr(group: dict, value: float) -> None:
    """Set a param group's lr, in place when it is a tensor (the compiled step)."""
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(value)
    else:
        group["lr"] = value


def set_beta1(group: dict, value: float) -> None:
    """Set beta1 (Adam) or momentum (SGD) in a param group, in place for tensors."""
    if "betas" in group:
        b1, b2 = group["betas"]
        if isinstance(b1, torch.Tensor):
            b1.fill_(value)
        else:
            group["betas"] = (value, b2)
    elif "momentum" in group:
        group["momentum"] = value


def beta1_of(group: dict) -> float:
    """beta1 (Adam) or momentum (SGD) of a param group, as a float."""
    value = group["betas"][0] if "betas" in group else group.get("momentum", 0.0)
    return float(value)
