"""The post's words, shared by ``toolkit sweep``, ``report`` and ``wd-find``: the names of
its optimizers and the metric its tables compare.

The post (fast.ai's "AdamW and super-convergence") compares Adam with L2 regularization
(Adam-L2, ``optim.name adam``) against decoupled weight decay (AdamW), each without and with
AMSGrad, by validation accuracy (a language model's by perplexity).
"""

from __future__ import annotations

from collections.abc import Iterable

from toolkit.target import higher_is_better  # noqa: F401  (report and wd-find use it)

OPTIMIZERS = {"adam": "Adam-L2", "adamw": "AdamW"}
"""``optim.name`` -> the post's name; a sweep names its folders after them in lower case."""
MAIN_METRICS = ("valid_accuracy", "valid_ppl", "valid_loss")
"""The metric compared unless one is asked for: the first of these the runs have."""


NAMES = {**OPTIMIZERS, "schedulefree-adamw": "Schedule-free AdamW", "muon": "Muon"}
"""``optim.name`` -> its name in tables: the post's, and today's contenders'."""


def optimizer_name(name: str) -> str:
    """The name of ``optim.name`` ``name`` in tables (:data:`NAMES`); another optimizer's
    in upper case (SGD)."""
    return NAMES.get(name, str(name).upper())


def default_metric(keys: Iterable[str]) -> str | None:
    """The first of :data:`MAIN_METRICS` among ``keys``; None when there is none."""
    keys = set(keys)
    return next((m for m in MAIN_METRICS if m in keys), None)
