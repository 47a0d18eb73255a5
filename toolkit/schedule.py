"""1cycle: the learning rate goes up then down while beta1 (or momentum) goes the other way.

One pure function of the step, :func:`shape_values`, gives the lr factor and beta1 of every
shape (``--schedule.shape``); the scheduler reads it, and the lr and beta1 it writes are
what ``metrics.jsonl`` logs and the plots draw:

* ``post`` (:func:`one_cycle`, the default): the post's shapes, below;
* ``fastai`` (:func:`fastai_one_cycle`): fastai v2's ``fit_one_cycle``, cosine up and down;
* ``flat-cos`` (:func:`flat_cos`): fastai v2's ``fit_flat_cos``;
* ``torch`` (:func:`torch_one_cycle`): torch's ``OneCycleLR``, two or three phases;
* ``wsd`` (:func:`wsd`): warmup-stable-decay with a linear, cosine or 1-sqrt cooldown;
* ``constant``.

The post's shapes (Gugger & Howard, 2018), after fastai 0.7's ``CircularLR_beta`` /
``TrainingPhase``:

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
from typing import Literal

import torch
from torch.optim.lr_scheduler import LRScheduler

from toolkit.errors import UserError


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


# ---- the 1cycle shapes users know today, as their sources compute them ----------------------
def _sched_cos(start: float, end: float, pos: float) -> float:
    """fastai v2's ``sched_cos`` (``callback/schedule.py``): half a cosine from ``start``
    (pos 0) to ``end`` (pos 1)."""
    return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


def _two_phases(pos: float, pct: float) -> tuple[int, float]:
    """fastai's ``combine_scheds([pct, 1 - pct], ...)``: the phase and the position in it."""
    if pos < pct:
        return 0, pos / pct
    return 1, (pos - pct) / (1 - pct)


def fastai_one_cycle(pos: float, *, div: float = 25.0, div_final: float = 1e5,
                     pct_start: float = 0.25, moms: Sequence[float] = (0.95, 0.85, 0.95)
                     ) -> tuple[float, float]:
    """fastai v2's ``fit_one_cycle``: ``(lr / lr_max, momentum)`` at ``pos = k / n_iter`` (the
    position its ``ParamScheduler`` gives batch ``k``): cosine from ``lr_max/div`` up to
    ``lr_max`` over ``pct_start``, cosine down to ``lr_max/div_final``; momentum by cosine
    ``moms[0] -> moms[1] -> moms[2]``."""
    phase, t = _two_phases(pos, pct_start)
    if phase == 0:
        return _sched_cos(1 / div, 1.0, t), _sched_cos(moms[0], moms[1], t)
    return _sched_cos(1.0, 1 / div_final, t), _sched_cos(moms[1], moms[2], t)


def flat_cos(pos: float, *, pct_start: float = 0.75, div_final: float = 1e5) -> float:
    """fastai v2's ``fit_flat_cos``: ``lr / lr`` flat at 1 until ``pct_start``, then cosine to
    ``1/div_final``; it leaves momentum alone."""
    phase, t = _two_phases(pos, pct_start)
    return 1.0 if phase == 0 else _sched_cos(1.0, 1 / div_final, t)


def torch_one_cycle(step: int, total_steps: int, *, pct_start: float = 0.3,
                    div_factor: float = 25.0, final_div_factor: float = 1e4,
                    anneal_strategy: str = "cos", three_phase: bool = False,
                    base_momentum: float = 0.85, max_momentum: float = 0.95
                    ) -> tuple[float, float]:
    """torch's ``OneCycleLR`` (``torch/optim/lr_scheduler.py``, ``get_lr``): ``(lr / max_lr,
    momentum)`` for optimizer step ``step``. Its phases end at steps ``pct_start * total - 1``
    (and ``2 * pct_start * total - 2`` with ``three_phase``) and ``total - 1``."""
    if not pct_start * total_steps > 1 or not pct_start < 1:
        raise UserError(f"--schedule.pytorch.pct-start={pct_start} over {total_steps} steps "
                        "leaves a phase without a step: raise it (or the steps), keep it < 1")
    initial = 1 / div_factor
    low = initial / final_div_factor
    if three_phase:
        phases = ((float(pct_start * total_steps) - 1, initial, 1.0, max_momentum, base_momentum),
                  (float(2 * pct_start * total_steps) - 2, 1.0, initial, base_momentum,
                   max_momentum),
                  (total_steps - 1, initial, low, max_momentum, max_momentum))
    else:
        phases = ((float(pct_start * total_steps) - 1, initial, 1.0, max_momentum, base_momentum),
                  (total_steps - 1, 1.0, low, base_momentum, max_momentum))

    def anneal(start: float, end: float, pct: float) -> float:
        if anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    start_step = 0.0
    for i, (end_step, lr0, lr1, m0, m1) in enumerate(phases):
        if step <= end_step or i == len(phases) - 1:
            pct = (step - start_step) / (end_step - start_step)
            return anneal(lr0, lr1, pct), anneal(m0, m1, pct)
        start_step = end_step
    raise AssertionError("unreachable")


WSDCooldown = Literal["linear", "cosine", "1-sqrt"]


def wsd(pos: float, *, warmup: float = 0.05, cooldown: float = 0.2,
        kind: WSDCooldown = "1-sqrt", final_frac: float = 0.0) -> float:
    """Warmup-stable-decay (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training
    Beyond Fixed Training Durations"): ``lr / lr`` linear from 0 over ``warmup``, flat at 1,
    then over the last ``cooldown`` of the run down to ``final_frac``: linearly, by half a
    cosine, or by ``1 - sqrt(t)`` (their best)."""
    if pos < warmup:
        return pos / warmup
    if pos < 1 - cooldown or cooldown == 0:
        return 1.0
    t = min((pos - (1 - cooldown)) / cooldown, 1.0)
    decay = {"linear": 1 - t, "cosine": (1 + math.cos(math.pi * t)) / 2,
             "1-sqrt": 1 - math.sqrt(t)}[kind]
    return final_frac + (1 - final_frac) * decay


Shape = Literal["post", "fastai", "flat-cos", "torch", "wsd", "constant"]
SHAPES: tuple[str, ...] = ("post", "fastai", "flat-cos", "torch", "wsd", "constant")


def shape_values(shape: str, step: int, total_steps: int, params: dict
                 ) -> tuple[float, float | None]:
    """``(lr / max_lr, beta1)`` that optimizer step ``step`` (0-based) of ``total_steps``
    takes under ``shape`` with its source's ``params``; beta1 is None for a shape that
    leaves it alone (flat-cos, wsd, constant). The scheduler reads the schedule here."""
    pos = step / total_steps
    if shape == "post":
        return one_cycle(pos, **params)
    if shape == "fastai":
        return fastai_one_cycle(pos, **params)
    if shape == "torch":
        return torch_one_cycle(step, total_steps, **params)
    if shape == "flat-cos":
        return flat_cos(pos, **params), None
    if shape == "wsd":
        return wsd(pos, **params), None
    return 1.0, None


class OneCycle(LRScheduler):
    """1cycle (or another shape of :data:`SHAPES`) as a torch scheduler: call ``step()``
    once per *optimizer* step.

    Writes ``lr`` (each group's initial lr times :func:`shape_values`, so discriminative
    learning rates keep their ratios) and ``betas[0]`` or ``momentum`` into every param
    group of the optimizer it is given, a strategy's wrapper included, where the shape
    cycles it. Tensor-valued lr and betas (the compiled step) are updated in place. Its
    ``state_dict`` holds the step. The keyword arguments are the post's shape; another
    shape takes its source's ``params`` (:class:`toolkit.config.ScheduleConfig`).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, *,
                 div: float = 10.0, pct: float = 0.1, phases: Sequence[float] | None = None,
                 moms: Sequence[float] = (0.95, 0.85), lin_end: bool = True,
                 final_frac: float | None = None, cycle_momentum: bool = True,
                 shape: str = "post", params: dict | None = None, last_epoch: int = -1):
        if total_steps < 1:
            raise ValueError(f"total_steps={total_steps} must be >= 1")
        check_one_cycle(div, pct, phases, moms, final_frac)
        self.total_steps, self.shape_name = total_steps, shape
        self.shape = dict(div=div, pct=pct, phases=None if phases is None else tuple(phases),
                          moms=tuple(moms), lin_end=lin_end, final_frac=final_frac) \
            if shape == "post" else dict(params or {})
        self.cycle_momentum = cycle_momentum
        super().__init__(optimizer, last_epoch)

    def values(self, step: int) -> tuple[float, float | None]:
        """``(lr factor, beta1)`` before optimizer step ``step`` (0-based); beta1 None
        where the shape leaves it alone."""
        return shape_values(self.shape_name, step, self.total_steps, self.shape)

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
        _, mom = self.values(self.last_epoch)
        if self.cycle_momentum and mom is not None:
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
