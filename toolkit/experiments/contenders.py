"""``toolkit sweep --grid contenders --lrs ...``: the post's question asked in 2026, is AdamW
+ 1cycle still the fastest way to train? Its five contenders, each at its own learning rate:

- ``adamw-post``: AdamW + the post's 1cycle (fastai 0.7's shape, the toolkit's default);
- ``adamw-fastai``: AdamW + fastai v2's ``fit_one_cycle`` (cosine phases);
- ``adamw-wsd``: AdamW + warmup-stable-decay (Hägele et al. 2024);
- ``schedulefree``: schedule-free AdamW (Defazio et al. 2024), its warm-up 5% of the steps;
- ``muon``: Muon on the hidden matrices, AdamW on the rest, under the post's 1cycle.

A badly tuned optimizer loses for the wrong reason (the post's lesson): each contender first
runs at every lr of ``--lrs`` with the first seed (plus ``--tune-args``, e.g. a validation
split of the training data), and the lr whose run ends best on the main metric (valid
accuracy, or perplexity; a diverged run is worst) is its own; one that wins at an end of its
grid is run one grid step further that way (``--extend`` times at most), so the grid's edge
does not choose for it. Then every seed runs at its lr; a
tuning run at the chosen lr counts as its seed's when ``--tune-args`` is empty. Folders are
``<contender>-lr<LR>-seed<S>`` (tuning ones ``tune-...``), ``OUT/contenders.json`` holds
every lr's metric and the choice, ``OUT/report/`` the report of the chosen runs (final
metric, time to target with the recipe's ``--target``).
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

from toolkit.atomic import write_atomic
from toolkit.errors import UserError
from toolkit.experiments.post import default_metric, higher_is_better
from toolkit.run_folder import FINISHED, RunFolder

CONTENDERS = {
    "adamw-post": "--optim.name adamw --schedule.shape post",
    "adamw-fastai": "--optim.name adamw --schedule.shape fastai",
    "adamw-wsd": "--optim.name adamw --schedule.shape wsd",
    "schedulefree": "--optim.name schedulefree-adamw --schedule.shape constant "
                    "--optim.warmup-pct 0.05",
    "muon": "--optim.name muon --schedule.shape post",
}
"""Contender -> its flags (before the sweep's common ones, so ``-- ...`` can override)."""


def parse_lrs(text: str | None) -> list[str]:
    """``"1e-3,3e-3"`` -> ``["1e-3", "3e-3"]`` (kept as written: they name folders)."""
    lrs = [v for v in (text or "").split(",") if v]
    try:
        ok = bool(lrs) and all(0 < float(v) < math.inf for v in lrs)
    except ValueError:
        ok = False
    if not ok or len(set(map(float, lrs))) != len(lrs):
        raise UserError(f"--lrs {text!r}: --grid contenders tunes each contender on a grid of "
                        "distinct learning rates > 0, e.g. --lrs 1e-3,3e-3,1e-2")
    return sorted(lrs, key=float)


def cell(name: str, lr: str, seed: int, tune_args: str = "") -> tuple[str, tuple[str, ...]]:
    """A run's folder name and flags."""
    prefix = "tune-" if tune_args else ""
    return (f"{prefix}{name}-lr{lr}-seed{seed}",
            (*shlex.split(CONTENDERS[name]), "--optim.lr", lr, "--seed", str(seed),
             *shlex.split(tune_args)))


def tuning(grids: dict[str, list[str]], seed: int, tune_args: str = ""
           ) -> list[tuple[str, tuple[str, ...]]]:
    """The tuning runs of each contender's lr grid."""
    return [cell(name, lr, seed, tune_args) for name, lrs in grids.items() for lr in lrs]


def extend(grids: dict[str, list[str]], chosen: dict[str, str]) -> bool:
    """One grid step further (the ratio of its two outer lrs) past each contender's lr that
    won at an end of its grid; whether any grid grew."""
    grew = False
    for name, lr in chosen.items():
        lrs = grids[name]
        if len(lrs) < 2 or lr not in (lrs[0], lrs[-1]):
            continue
        if lr == lrs[-1]:
            lrs.append(f"{float(lr) * float(lrs[-1]) / float(lrs[-2]):.3g}")
        else:
            lrs.insert(0, f"{float(lr) * float(lrs[0]) / float(lrs[1]):.3g}")
        grew = True
    return grew


def final(chosen: dict[str, str], seeds: list[int]) -> list[tuple[str, tuple[str, ...]]]:
    return [cell(name, lr, seed) for name, lr in chosen.items() for seed in seeds]


def score(folder: Path) -> tuple[str | None, float | None]:
    """The main metric a finished run ended at (None: unfinished or failed)."""
    run = RunFolder(folder)
    if run.status() != FINISHED:
        return None, None
    results = run.read_results()
    key = default_metric(results)
    return key, (None if key is None else results[key])


def choose(out: Path, grids: dict[str, list[str]], seed: int, tune_args: str = ""
           ) -> dict[str, str]:
    """Each contender's lr: the best main metric among its tuning runs (one that did not
    finish, or ended at NaN, is worst), written with every run's metric to
    ``out/contenders.json``."""
    table, chosen = {}, {}
    for name, lrs in grids.items():
        scores = {lr: score(out / cell(name, lr, seed, tune_args)[0]) for lr in lrs}
        keys = {k for k, _ in scores.values() if k}
        if not keys:
            raise UserError(f"contender {name}: no tuning run finished with a metric (see "
                            f"{out}/{cell(name, lrs[0], seed, tune_args)[0]}.log)")
        key = keys.pop()
        sign = 1 if higher_is_better(key) else -1
        ranked = [lr for lr, (_, v) in scores.items() if v is not None and not math.isnan(v)]
        chosen[name] = max(ranked, key=lambda lr: sign * scores[lr][1]) if ranked else lrs[0]
        table[name] = {"metric": key, "by_lr": {lr: v for lr, (_, v) in scores.items()},
                       "lr": chosen[name]}
    write_atomic(out / "contenders.json", json.dumps(table, indent=2) + "\n")
    return chosen
