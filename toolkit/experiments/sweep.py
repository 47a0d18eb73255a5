"""``toolkit sweep``: a grid of runs of one recipe, one run folder per cell.

    toolkit sweep recipes/digits.py --out runs/grid --grid post --seeds 0 1 2 \\
        --adam-l2-args="--preset adam-l2"
    toolkit sweep recipes/digits.py --out runs/wd --vary optim.wd=1e-4,1e-3,1e-2 -- --epochs 5
    toolkit sweep recipes/cifar10.py --out /shared/runs/grid --grid post --slurm \\
        --sbatch-args="-p gpu --gres=gpu:1 --ntasks-per-node=1" -- --data-dir /shared/cifar10

The cells are the product of the post's grid (``--grid post``: Adam with L2 / AdamW x
AMSGrad off / on), every ``--vary FIELD=V1,V2,...`` and the seeds, or today's contenders
tuned on ``--lrs`` then run for every seed (``--grid contenders``:
:mod:`toolkit.experiments.contenders`); a cell's folder is named
after its values (``adamw-amsgrad-wd0.001-seed1``). Arguments after ``--`` go to every cell.

Cells run one after another here (``--launcher python``, ``torchrun``, ``accelerate`` or
``deepspeed`` with ``--nproc`` processes) or as a Slurm job array (``--slurm``:
``slurm/grid.sbatch`` with the cells written to ``OUT/cells.tsv``). A finished cell (its
``results.json`` written: :meth:`toolkit.run_folder.RunFolder.status`) is skipped; any other
starts with ``--resume auto``, so an interrupted cell goes on from its newest checkpoint.
A failed cell is reported and the others still run; the sweep exits 1 if
any failed, and writes its summary to ``OUT/sweep.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import UserError
from toolkit.experiments import contenders, report
from toolkit.experiments.post import OPTIMIZERS
from toolkit.run_folder import FINISHED, NEW, RunFolder

ROOT = Path(__file__).resolve().parents[2]
GRID_SCRIPT = ROOT / "slurm" / "grid.sbatch"


@dataclass(frozen=True)
class SweepCell:
    """One run of the grid: its folder's name and its flags."""

    name: str
    args: tuple[str, ...]
    """The recipe flags that make this cell (after the sweep's common ones)."""


def post_grid(adam_l2_args: str, adamw_args: str) -> list[tuple[str, list[str]]]:
    """The post's four optimizers: Adam with L2 / AdamW, without / with AMSGrad (each with
    its own flags, by default ``--optim.name`` alone)."""
    flags = {"adam": adam_l2_args, "adamw": adamw_args}
    out = []
    for amsgrad in (False, True):
        for optim, name in OPTIMIZERS.items():
            suffix, flag = ("-amsgrad", "--optim.amsgrad") if amsgrad else ("",
                                                                           "--optim.no-amsgrad")
            args = shlex.split(flags[optim] or f"--optim.name {optim}")
            out.append((name.lower() + suffix, [*args, flag]))
    return out


def parse_vary(spec: str) -> tuple[str, list[str]]:
    """``optim.wd=1e-4,1e-3`` -> ("optim.wd", ["1e-4", "1e-3"]); one line when malformed."""
    field, sep, values = spec.partition("=")
    parts = [v for v in values.split(",") if v]
    if not sep or not field or not parts or field.startswith("-"):
        raise UserError(f"--vary {spec!r}: write FIELD=V1,V2,... (e.g. optim.wd=1e-4,1e-3)")
    return field, parts


def check_seeds(seeds: list[int]) -> None:
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {seeds} names a seed twice")


def cells(grid: str | None, seeds: list[int], vary: list[str], adam_l2_args: str = "",
          adamw_args: str = "") -> list[SweepCell]:
    """The grid's cells in a fixed order (optimizers, then each varied field, then seeds)."""
    axes: list[list[tuple[str, list[str]]]] = []
    if grid == "post":
        axes.append(post_grid(adam_l2_args, adamw_args))
    elif grid is not None:
        raise UserError(f"--grid {grid!r} is unknown; choose post or contenders (or omit it)")
    for spec in vary:
        field, values = parse_vary(spec)
        short = field.rsplit(".", 1)[-1].replace("_", "-")
        axes.append([(f"{short}{v}", [f"--{field}", v]) for v in values])
    check_seeds(seeds)
    axes.append([(f"seed{s}", ["--seed", str(s)]) for s in seeds])
    return [SweepCell("-".join(n for n, _ in combo), tuple(a for _, args in combo for a in args))
            for combo in itertools.product(*axes)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_prefix(launcher: str, nproc: int, config: str | None) -> list[str]:
    """The command line before the recipe: this interpreter, under ``launcher`` with ``nproc``
    processes on a free port (``config``: accelerate launch's --config_file)."""
    py = sys.executable
    if launcher == "python":
        return [py]
    if launcher == "torchrun":
        return [py, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    if launcher == "accelerate":
        return [py, "-m", "accelerate.commands.launch", "--num_processes", str(nproc),
                *(["--config_file", config] if config else []),
                "--main_process_port", str(free_port())]
    if launcher == "deepspeed":  # passes --local_rank=N to each worker
        return [py, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
                "--master_port", str(free_port())]
    raise UserError(f"--launcher {launcher!r} is unknown; choose python, torchrun, accelerate "
                    "or deepspeed")


def run_local(recipe: Path, out: Path, grid: list[SweepCell], common: list[str], *,
              launcher: str = "python", nproc: int = 2, config: str | None = None) -> dict:
    """Run the unfinished cells one after another; the summary (also ``out/sweep.json``)."""
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for i, cell in enumerate(grid):
        folder = out / cell.name
        before = RunFolder(folder).status()
        if before == FINISHED:
            print(f"[{i + 1}/{len(grid)}] {cell.name}: finished, skipped", flush=True)
            summary[cell.name] = {"status": "skipped"}
            continue
        cmd = [*launch_prefix(launcher, nproc, config), str(recipe), *common, *cell.args,
               "--output-dir", str(folder), "--resume", "auto", "--no-progress"]
        print(f"[{i + 1}/{len(grid)}] {cell.name}: {'resuming' if before != NEW else 'starting'}"
              f" ({out / (cell.name + '.log')})", flush=True)
        started = time.monotonic()
        with open(out / f"{cell.name}.log", "a") as log:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        took = round(time.monotonic() - started, 1)
        ok = code == 0 and RunFolder(folder).status() == FINISHED
        summary[cell.name] = {"status": "finished" if ok else "failed", "exit_code": code,
                              "seconds": took}
        if not ok:
            print(f"    {cell.name}: failed with exit code {code} (log: "
                  f"{out / (cell.name + '.log')}); the other cells go on", flush=True)
    (out / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def submit_slurm(recipe: Path, out: Path, grid: list[SweepCell], common: list[str],
                 sbatch_args: str = "") -> str:
    """Submit the cells as a job array of ``slurm/grid.sbatch``; the job id."""
    out.mkdir(parents=True, exist_ok=True)
    table = out / "cells.tsv"
    table.write_text("".join(f"{c.name}\t{shlex.join(c.args)}\n" for c in grid))
    env_args = {"RECIPE": str(recipe), "GRID_DIR": str(out), "CELLS": str(table),
                "ARGS": shlex.join(common), "PYTHON": sys.executable, "TOOLKIT_DIR": str(ROOT)}
    cmd = ["sbatch", "--parsable", f"--array=0-{len(grid) - 1}", "-o",
           str(out / "slurm-%A_%a.out"), *shlex.split(sbatch_args), str(GRID_SCRIPT)]
    try:
        p = subprocess.run(cmd, env={**os.environ, **env_args}, capture_output=True, text=True)
    except FileNotFoundError:
        raise UserError("--slurm: sbatch is not installed on this machine") from None
    if p.returncode != 0:
        raise UserError(f"sbatch refused the array: {(p.stderr or p.stdout).strip()}")
    return p.stdout.strip().split(";")[0]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="toolkit sweep", description=__doc__.splitlines()[0])
    p.add_argument("recipe", help="the recipe file, e.g. recipes/digits.py")
    p.add_argument("--out", required=True, help="the sweep folder (one run folder per cell)")
    p.add_argument("--grid", choices=["post", "contenders"],
                   help=f"post: {' / '.join(OPTIMIZERS.values())} x AMSGrad off / on; "
                   f"contenders: {', '.join(contenders.CONTENDERS)}, each at its best of --lrs")
    p.add_argument("--lrs", help="--grid contenders: the learning rates each contender is tuned "
                   "on (first seed), e.g. 1e-3,3e-3,1e-2")
    p.add_argument("--extend", type=int, default=2, help="--grid contenders: grid steps "
                   "added past an lr that wins at an end of the grid, at most (default 2)")
    p.add_argument("--tune-args", default="", help="--grid contenders: flags of the tuning runs "
                   "only (e.g. a validation split of the training data)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--vary", action="append", default=[], metavar="FIELD=V1,V2",
                   help="a config field and its values (repeatable), e.g. optim.wd=1e-4,1e-3")
    p.add_argument("--adam-l2-args", default="", help="flags of the Adam-L2 cells "
                   "(default --optim.name adam; digits: --preset adam-l2)")
    p.add_argument("--adamw-args", default="", help="flags of the AdamW cells "
                   "(default --optim.name adamw)")
    p.add_argument("--launcher", default="python",
                   help="python, torchrun, accelerate or deepspeed")
    p.add_argument("--nproc", type=int, default=2, help="processes per cell (all but python)")
    p.add_argument("--config-file", help="accelerate launch's --config_file")
    p.add_argument("--slurm", action="store_true", help="submit a Slurm job array instead")
    p.add_argument("--sbatch-args", default="", help="extra sbatch flags with --slurm")
    return p


def run_contenders(recipe: Path, out: Path, common: list[str],
                   ns: argparse.Namespace) -> dict | None:
    """Tune each contender on ``--lrs``, then run every seed at its lr, and report those runs
    (``out/report/``); the summary, or None when Slurm jobs were submitted (submit again once
    the tuning array is done: it submits the seeds)."""
    if ns.vary:
        raise UserError("--grid contenders takes no --vary: its cells are the contenders x "
                        "--lrs, then the seeds at each one's lr")
    lrs = contenders.parse_lrs(ns.lrs)
    check_seeds(ns.seeds)
    if ns.extend < 0:
        raise UserError(f"--extend {ns.extend} must be >= 0")
    grids = {name: list(lrs) for name in contenders.CONTENDERS}
    local = dict(launcher=ns.launcher, nproc=ns.nproc, config=ns.config_file)
    summary: dict = {}
    for extended in range(ns.extend + 1):
        tune = [SweepCell(*c) for c in contenders.tuning(grids, ns.seeds[0], ns.tune_args)]
        todo = [c for c in tune if c.name not in summary
                and RunFolder(out / c.name).status() != FINISHED]  # a failed run: once
        if todo:
            if ns.slurm:
                job = submit_slurm(recipe, out, tune, common, ns.sbatch_args)
                print(f"submitted job array {job}: {len(tune)} tuning runs into {out}; when "
                      "they are done, submit the same command again (it extends a grid "
                      "whose edge won, then runs the seeds at each one's lr)")
                return None
            summary.update(run_local(recipe, out, todo, common, **local))
        chosen = contenders.choose(out, grids, ns.seeds[0], ns.tune_args)
        if extended == ns.extend or not contenders.extend(grids, chosen):
            break
    print("each contender's lr: " + ", ".join(f"{n} {lr}" for n, lr in chosen.items()) +
          f" ({out / 'contenders.json'})", flush=True)
    runs = [SweepCell(*c) for c in contenders.final(chosen, ns.seeds)]
    if ns.slurm:
        job = submit_slurm(recipe, out, runs, common, ns.sbatch_args)
        print(f"submitted job array {job}: {len(runs)} runs at the chosen lrs into {out}")
        return None
    summary.update(run_local(recipe, out, runs, common, **local))
    (out / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    finished = [out / c.name for c in runs if RunFolder(out / c.name).status() == FINISHED]
    if finished:
        print(f"report of the runs at the chosen lrs: "
              f"{report.report(report.load_runs(finished), out / 'report')}", flush=True)
    return summary


def split_common(argv: list[str]) -> tuple[list[str], list[str]]:
    """The sweep's own arguments and, after ``--``, the recipe's."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: list[str]) -> None:
    own, common = split_common(argv)
    ns = parser().parse_args(own)
    recipe = Path(ns.recipe)
    if not recipe.is_file():
        raise UserError(f"recipe {recipe} is not a file (e.g. recipes/digits.py)")
    if ns.nproc < 1:
        raise UserError(f"--nproc {ns.nproc} must be >= 1")
    out = Path(ns.out)
    if ns.grid == "contenders":
        summary = run_contenders(recipe, out, common, ns)
        if summary is None:
            return
    else:
        grid = cells(ns.grid, ns.seeds, ns.vary, ns.adam_l2_args, ns.adamw_args)
        if ns.slurm:
            job = submit_slurm(recipe, out, grid, common, ns.sbatch_args)
            print(f"submitted job array {job}: {len(grid)} cells into {out} "
                  f"(squeue -j {job}; re-submit to run what is missing)")
            return
        summary = run_local(recipe, out, grid, common, launcher=ns.launcher, nproc=ns.nproc,
                            config=ns.config_file)
    failed = [name for name, s in summary.items() if s["status"] == "failed"]
    done = len(summary) - len(failed)
    print(f"sweep {out}: {done} of {len(summary)} cells finished"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    if failed:
        sys.exit(1)
