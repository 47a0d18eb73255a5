"""Synthetic run folders for tests/test_report.py, in the formats toolkit/trainer.py writes:
config.json (the resolved recipe config), metrics.jsonl (train rows every 5 steps, eval
rows) and, when finished, results.json."""

from __future__ import annotations

import json
from pathlib import Path


def write_run(path: Path, *, optim: str = "adamw", amsgrad: bool = False, seed: int = 0,
              wd: float = 1e-2, evals: tuple[float, ...] = (0.5, 0.9, 0.8),
              metric: str = "valid_accuracy", finished: bool = True, tta: float | None = None,
              wall_time_s: float = 1.0, steps: int = 30, extra: dict | None = None) -> Path:
    """A run of ``steps`` steps whose eval rows (evenly spaced, the last at the end) hold
    ``evals``; unfinished: no results.json and metrics up to a third of the way."""
    path.mkdir(parents=True)
    config = {"train": {"output_dir": str(path), "epochs": 3, "max_steps": steps,
                        "batch_size": 64, "log_every": 5, "resume": "auto", "seed": seed,
                        "lr_find": False, "progress": False},
              "optim": {"name": optim, "lr": 1e-2, "betas": [0.95, 0.99], "eps": 1e-8,
                        "wd": wd, "amsgrad": amsgrad, "momentum": 0.9},
              "schedule": {"div": 10, "pct": 0.1, "moms": [0.95, 0.85]},
              "width": 32, "tta": tta is not None, **(extra or {})}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    last = steps if finished else steps // 3
    mom = "momentum" if optim == "sgd" else "beta1"
    rows = [{"step": s, "epoch": s / 10, "stage": 0, "lr": 1e-2 * s / steps,
             mom: 0.95 - 0.1 * s / steps, "train_loss": 2.0 / s + seed / 100}
            for s in range(5, last + 1, 5)]
    eval_steps = [steps * (i + 1) // len(evals) for i in range(len(evals))]
    for s, v in zip(eval_steps, evals):
        if s <= last:
            rows.append({"step": s, "stage": 0, "epoch": s / 10, metric: v,
                         **({"valid_loss": 1 - v} if metric != "valid_loss" else {})})
    rows.sort(key=lambda r: (r["step"], "train_loss" not in r))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        results = {"step": steps, "epochs": steps / 10, "wall_time_s": wall_time_s,
                   "checkpoint": str(path / "checkpoints" / f"step_{steps}"),
                   "train_loss": rows[-1].get("train_loss", 0.1), metric: evals[-1]}
        if tta is not None:
            results.update(plain_accuracy=evals[-1], tta_accuracy=tta, tta_fixed_accuracy=tta)
        (path / "results.json").write_text(json.dumps(results, indent=2))
    return path


def grid_value(optim: str, amsgrad: bool, seed: int) -> float:
    """Known, distinct final accuracies of the post's grid."""
    return 0.90 + 0.03 * (optim == "adamw") + 0.01 * amsgrad + [0.004, -0.011, 0.017][seed]


def write_grid(root: Path, seeds: tuple[int, ...] = (0, 1, 2), tta: bool = True,
               wall_time_s: float = 1.0) -> dict[tuple[str, bool], list[float]]:
    """The 2 x 2 x seeds grid under ``root`` (folders named as ``toolkit sweep`` does);
    returns each cell's final accuracies, (optim, amsgrad) -> values in seed order."""
    values: dict[tuple[str, bool], list[float]] = {}
    for optim in ("adam", "adamw"):
        for amsgrad in (False, True):
            for seed in seeds:
                v = grid_value(optim, amsgrad, seed)
                name = f"{optim}{'-amsgrad' if amsgrad else ''}-seed{seed}"
                write_run(root / name, optim=optim, amsgrad=amsgrad, seed=seed,
                          wd=1e-4 if optim == "adam" else 1e-2, evals=(v - 0.2, v + 0.01, v),
                          tta=v + 0.005 if tta else None, wall_time_s=wall_time_s + seed)
                values.setdefault((optim, amsgrad), []).append(v)
    return values
