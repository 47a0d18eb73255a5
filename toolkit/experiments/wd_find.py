"""``toolkit wd-find``: the best weight decay for L2 and for decoupled decay, side by side.

    toolkit wd-find recipes/digits.py --out runs/wd-find -- --epochs 5

The post's practical lesson: Adam needs more regularization than SGD, and the best weight
decay differs by orders of magnitude between L2 in the loss (Adam) and decoupled decay
(AdamW); on CIFAR-10 it found L2's best near 1e-6-scale values at max lr 1e-3 and decoupled
decay's at 0.3 with lr 3e-3. This runs the LR range test once (or takes ``--lr``), then short
1cycle runs at that lr over a log grid of weight decays (``--wds``) for both kinds, through
:mod:`~toolkit.experiments.sweep` (finished cells are skipped when run again), and
reports the best of each, their ratio and a plot (``OUT/wd_find.png``, numbers in
``OUT/wd_find.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

from toolkit.config import write_json
from toolkit.errors import UserError
from toolkit.experiments.post import MAIN_METRICS, default_metric, higher_is_better, optimizer_name
from toolkit.run_folder import RunFolder
from toolkit.experiments.sweep import SweepCell, launch_prefix, run_local, split_common

KINDS = {"l2": "adam", "decoupled": "adamw"}  # the kind of weight decay -> its optim.name
WDS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def find_lr(recipe: Path, out: Path, common: list[str], launcher: str, nproc: int) -> float:
    """The LR range test's first (valley) suggestion, run once into ``out/lr_find``."""
    folder = RunFolder(out / "lr_find")
    if not folder.lr_find.is_file():
        cmd = [*launch_prefix(launcher, nproc, None), str(recipe), *common, "--lr-find",
               "--output-dir", str(folder.path), "--no-progress"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise UserError(f"the LR range test failed (exit {p.returncode}): "
                            f"{(p.stderr.strip().splitlines() or ['no output'])[-1]}")
    found = folder.read_lr_find()["suggestions"]
    if not found:
        raise UserError(f"the LR range test in {folder.path} suggests no lr (no finite loss); "
                        "pass --lr")
    return next(iter(found.values()))


def grid(lr: float, wds: list[float], seeds: list[int]) -> list[SweepCell]:
    return [SweepCell(f"{kind}-wd{wd:g}-seed{seed}",
                      ("--optim.name", name, "--optim.lr", repr(lr), "--optim.wd", repr(wd),
                       "--seed", str(seed)))
            for kind, name in KINDS.items() for wd in wds for seed in seeds]


def pick_metric(results: dict, asked: str | None) -> str:
    metric = asked or default_metric(results)
    if metric is None:
        raise UserError(f"no {', '.join(MAIN_METRICS)} in results ({sorted(results)}); name "
                        "one with --metric")
    return metric


def summarize(out: Path, lr: float, wds: list[float], seeds: list[int],
              metric: str | None) -> dict:
    """Mean metric per kind and wd over the seeds, the best wd of each kind and their ratio."""
    table: dict[str, dict[str, float]] = {}
    for kind in KINDS:
        table[kind] = {}
        for wd in wds:
            values = []
            for seed in seeds:
                folder = RunFolder(out / f"{kind}-wd{wd:g}-seed{seed}")
                results = folder.read_results()
                if results is not None:
                    metric = pick_metric(results, metric)
                    if metric not in results:
                        raise UserError(f"{folder.results} has no {metric}; choose --metric among "
                                        f"{', '.join(sorted(results))}")
                    values.append(float(results[metric]))
            if values and all(math.isfinite(v) for v in values):
                table[kind][f"{wd:g}"] = statistics.fmean(values)
    if metric is None or not all(table.values()):
        raise UserError(f"no finished run for {'both kinds' if metric else 'any cell'} in {out}")
    lower = not higher_is_better(metric)
    best = {kind: (min if lower else max)(row, key=row.get) for kind, row in table.items()}
    return {"lr": lr, "metric": metric, "lower_is_better": lower, "seeds": seeds,
            "table": table, "best_wd": {k: float(v) for k, v in best.items()},
            "best": {k: table[k][v] for k, v in best.items()},
            "ratio_decoupled_to_l2": float(best["decoupled"]) / float(best["l2"])
            if float(best["l2"]) else None}


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, (kind, row) in enumerate(summary["table"].items()):
        wds = sorted(row, key=float)
        ax.plot([float(w) for w in wds], [row[w] for w in wds], "o-", color=f"C{k}",
                label=f"{optimizer_name(KINDS[kind])}: best wd {summary['best_wd'][kind]:g}")
        ax.plot(summary["best_wd"][kind], summary["best"][kind], "*", ms=14, color=f"C{k}")
    ax.set(xscale="log", xlabel="weight decay", ylabel=summary["metric"],
           title=f"weight decay at lr {summary['lr']:.3g} "
                 f"(decoupled / L2 = {summary['ratio_decoupled_to_l2'] or float('nan'):.3g})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def main(argv: list[str]) -> None:
    own, common = split_common(argv)
    p = argparse.ArgumentParser(prog="toolkit wd-find", description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("--out", required=True)
    p.add_argument("--wds", type=float, nargs="+", default=list(WDS),
                   help=f"weight decays to try (default {' '.join(f'{w:g}' for w in WDS)})")
    p.add_argument("--lr", type=float, help="max lr of every run (default: the LR range "
                   "test's valley suggestion)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--metric", help=f"{RunFolder.RESULTS} key to compare (default: the first "
                   f"present of {', '.join(MAIN_METRICS)})")
    p.add_argument("--launcher", default="python")
    p.add_argument("--nproc", type=int, default=2)
    ns = p.parse_args(own)
    recipe, out = Path(ns.recipe), Path(ns.out)
    if not recipe.is_file():
        raise UserError(f"recipe {recipe} is not a file (e.g. recipes/digits.py)")
    bad = [w for w in ns.wds if not (w >= 0 and math.isfinite(w))]
    if bad or len(set(ns.wds)) != len(ns.wds):
        raise UserError(f"--wds {ns.wds}: distinct finite values >= 0")
    if ns.lr is not None and not (ns.lr > 0 and math.isfinite(ns.lr)):
        raise UserError(f"--lr {ns.lr} must be > 0")
    out.mkdir(parents=True, exist_ok=True)
    lr = ns.lr if ns.lr is not None else find_lr(recipe, out, common, ns.launcher, ns.nproc)
    print(f"wd-find: lr {lr:.4g}" + ("" if ns.lr else " (the LR range test's suggestion)"),
          flush=True)
    run_local(recipe, out, grid(lr, ns.wds, ns.seeds), common, launcher=ns.launcher,
              nproc=ns.nproc)
    summary = summarize(out, lr, ns.wds, ns.seeds, ns.metric)
    write_json(out / "wd_find.json", summary)
    plot(summary, out / "wd_find.png")
    b = summary["best_wd"]
    print(f"best wd: L2 {b['l2']:g} ({summary['metric']} {summary['best']['l2']:.4g}), "
          f"decoupled {b['decoupled']:g} ({summary['best']['decoupled']:.4g}); decoupled / L2 "
          f"= {summary['ratio_decoupled_to_l2'] or float('nan'):.3g} (plot: {out / 'wd_find.png'})")
    if any(c["status"] == "failed" for c in json.loads((out / "sweep.json").read_text()).values()):
        sys.exit(1)
