"""A run's stages: each a 1cycle of its own over some epochs, training some layer groups.

fastai 0.7's ``fit_opt_sched`` (the post's code) built an optimizer per call; the post's
Stanford Cars run is two stages: 20 epochs of the head at 1e-2, then 40 of everything at
3e-3 x (1/9, 1/3, 1). A run of one stage is the common case.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass

from toolkit.config import OptimConfig, ScheduleConfig
from toolkit.errors import UserError


@dataclass
class Stage:
    """One cycle of a run: ``epochs`` of a 1cycle ``schedule`` with a fresh ``optim``,
    training the layer groups ``train_groups`` (indices; None: all) while the others are
    frozen."""

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


def check_head_first(freeze_epochs: int, freeze_lr: float) -> None:
    """A recipe's ``--freeze-epochs``/``--freeze-lr`` (:func:`head_first`); a ValueError
    that the config turns into one line."""
    if freeze_epochs < 0:
        raise ValueError(f"--freeze-epochs={freeze_epochs} must be >= 0")
    if not freeze_lr > 0:
        raise ValueError(f"--freeze-lr={freeze_lr} must be > 0")


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
        if stage.optim.name == "schedulefree-adamw" and (
                stage.schedule.shape != "constant" or len(stages) > 1):
            raise UserError("schedulefree-adamw has no schedule but its own warm-up "
                            "(--optim.warmup-steps or -pct): run it with --schedule.shape "
                            f"constant, in one stage (this run: shape {stage.schedule.shape}, "
                            f"{len(stages)} stage{'s' if len(stages) > 1 else ''})")
        bad = [g for g in stage.train_groups or () if not 0 <= g < layer_groups]
        if bad or stage.train_groups == ():
            raise UserError(f"stage {i} trains layer groups {stage.train_groups}; the model has "
                            f"{layer_groups} (0..{layer_groups - 1}), name at least one")


def stage_ends(stages: list[Stage], steps_of: Callable[[int], int],
               max_steps: int | None) -> tuple[list[int], int]:
    """The step at which each stage's cycle ends (stage i runs steps ``[ends[i-1],
    ends[i])``) and the run's last step; ``steps_of(epochs)`` counts optimizer steps.
    ``max_steps`` cuts the run short: one stage's cycle then spans ``max_steps``, a later
    stage's keeps its length."""
    ends = [steps_of(e) for e in itertools.accumulate(s.epochs for s in stages)]
    total = ends[-1] if max_steps is None else min(ends[-1], max_steps)
    return ([total] if len(stages) == 1 else ends), total


def stage_at(ends: list[int], step: int) -> int:
    """The stage that takes optimizer step ``step + 1`` (the last one at the end)."""
    return min(bisect.bisect_right(ends, step), len(ends) - 1)
