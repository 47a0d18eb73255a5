"""Time to target, the post's own measure (and DAWNBench's): the first evaluation at which a
metric reaches a value, with its step, epoch and training seconds.

``--target valid_accuracy=0.94`` (or ``valid_ppl=70``): higher is better for accuracies,
lower for everything else (losses, perplexities). The trainer checks it at each evaluation;
``--stop-at-target`` ends the run there. The record and the seconds are part of every
checkpoint, so a resumed run reports what an uninterrupted one does.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from toolkit.errors import UserError


def higher_is_better(metric: str) -> bool:
    """Accuracies rise; losses, perplexities and times fall."""
    return "accuracy" in metric


@dataclass(frozen=True)
class Target:
    metric: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Target:
        """``METRIC=VALUE``; a ValueError (one line) for anything else."""
        metric, sep, value = text.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not metric.startswith("valid_") or not math.isfinite(number):
            raise ValueError(f"--target={text!r} must be METRIC=VALUE with a validation metric "
                             "and a finite number, e.g. valid_accuracy=0.94 or valid_ppl=70")
        return cls(metric, number)

    def reached(self, metrics: dict[str, float]) -> bool:
        """Whether ``metrics`` (an evaluation's) reach the target; a missing metric is a
        one-line UserError naming the ones there are."""
        if self.metric not in metrics:
            raise UserError(f"--target names {self.metric}, which this recipe's evaluation "
                             f"does not report; it reports {', '.join(sorted(metrics))}")
        got = metrics[self.metric]
        return got >= self.value if higher_is_better(self.metric) else got <= self.value


class Clock:
    """A run's training seconds, summed over its segments (a resume adds to them), and the
    first evaluation that reached its target; both go into every checkpoint."""

    def __init__(self, target: Target | None = None, stop: bool = False):
        self.target, self.stop = target, stop
        self.seconds, self.hit, self._since = 0.0, None, None
        self.stopped = False  # the run reached its target and stops there

    def start(self) -> None:
        """A segment starts (a fresh run or a resume)."""
        self._since = time.time()

    def now(self) -> float:
        return self.seconds + (time.time() - self._since if self._since is not None else 0.0)

    def check(self, metrics: dict[str, float], step: int, epoch: float) -> bool:
        """Record the first evaluation that reaches the target; True when the run should stop
        here (``--stop-at-target``)."""
        if self.target is None or self.hit is not None or not self.target.reached(metrics):
            return False
        self.hit = {"step": step, "epoch": epoch, "train_seconds": round(self.now(), 2),
                    self.target.metric: metrics[self.target.metric]}
        self.stopped = self.stop
        return self.stop

    def result(self) -> dict:
        """``results.json``'s ``target`` (when one was set) and ``train_seconds``."""
        out: dict = {"train_seconds": round(self.now(), 2)}
        if self.target is not None:
            out["target"] = {"metric": self.target.metric, "value": self.target.value,
                             "reached": self.hit is not None, **(self.hit or {})}
        return out

    def state_dict(self) -> dict:
        return {"seconds": self.now(), "hit": self.hit, "target": self.target and (
            self.target.metric, self.target.value)}

    def load_state_dict(self, state: dict) -> None:
        """The seconds; the record only if it was this target's (a resume with another
        --target looks for its own from there on)."""
        mine = self.target and (self.target.metric, self.target.value)
        same = tuple(state.get("target") or ()) == tuple(mine or ())
        self.seconds, self._since = state["seconds"], time.time()
        self.hit = state["hit"] if same else None
        self.stopped = self.stop and self.hit is not None
