"""``toolkit report RUN_DIRS...``: the post's results table and plots of a set of runs.

    toolkit report runs/grid                      # a sweep's folder: every run folder in it
    toolkit report runs/a runs/b --metric valid_loss --out report/

writes ``report/report.md`` and ``report/report.html`` (the same content; the PNGs beside
them). The table is the post's: rows Adam-L2 (``optim.name adam``) and AdamW, any other
optimizer a row of its own; columns without / with AMSGrad; in each cell the mean ± sample
std (ddof 1) over seeds of a ``results.json`` metric. Config fields that differ between runs
split them further: a field constant within each optimizer row (Adam-L2's wd 1e-4 against
AdamW's 1e-2 in the digits grid) names its row, any other gets one table per value.
Unfinished runs (no ``results.json``) are listed and plotted, and in no mean. The same runs
give a byte-identical report.md; ``--no-wall-time`` drops its one measured column, so that a
sweep killed and resumed reports exactly what an uninterrupted one does.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from toolkit.errors import UserError
from toolkit.experiments.post import (MAIN_METRICS, OPTIMIZERS, default_metric, higher_is_better,
                          optimizer_name)
from toolkit.run_folder import FINISHED, RunFolder
from toolkit.target import Target

# Where and how a run ran, not what it trained: never a reason to tell runs apart.
RUN_LOCAL = {"train.output_dir", "train.seed", "train.resume", "train.progress",
             "train.lr_find", "train.checkpoint_every", "train.keep_checkpoints",
             "train.dist_timeout", "data_dir"}
EXTRA_METRICS = ("tta_accuracy", "tta_fixed_accuracy", "valid_cache_ppl", "test_ppl",
                 "test_cache_ppl")  # a post table each, where the runs' results have them
Series = dict[str, list[tuple[str, list[int], list[float]]]]  # cell -> [(run, steps, values)]
# What a report says, rendered as markdown and as HTML: ("h1".."h3", text), ("p", text),
# ("table", (header, rows)), ("img", (file, alt)), ("ul", items).
Blocks = list[tuple[str, object]]


@dataclass
class RunDir:
    """What a run folder holds. ``config`` is flattened (``optim.wd``), empty for a folder
    with only ``lr_find.json``; ``results`` is None while the run is unfinished; ``status``
    is :meth:`toolkit.run_folder.RunFolder.status`."""

    name: str
    config: dict
    rows: list[dict]
    results: dict | None
    lr_find: dict | None
    status: str

    @property
    def last_step(self) -> int:
        return max((r["step"] for r in self.rows), default=0)


class TableCell(NamedTuple):
    """The runs of one cell of a results table: the same settings, seeds apart."""

    table: tuple  # ((field, value), ...): the fields that get a table per value
    optimizer: str  # "Adam-L2", "AdamW", "SGD"
    detail: str  # the row's own fields, "optim.wd=0.0001"
    amsgrad: bool

    @property
    def row(self) -> str:
        return f"{self.optimizer} ({self.detail})" if self.detail else self.optimizer

    @property
    def label(self) -> str:
        return ", ".join([self.row + (" + AMSGrad" if self.amsgrad else "")]
                         + [f"{k}={v}" for k, v in self.table])


def _is_run(path: Path) -> bool:
    folder = RunFolder(path)
    return folder.config.is_file() or folder.lr_find.is_file()


def find_runs(paths: list[str | Path]) -> list[Path]:
    """The run folders among ``paths``: each a run (config.json or lr_find.json in it) or a
    folder of runs one level down (a sweep's ``--out``)."""
    if not paths:
        raise UserError("no run folders given: pass RUN_DIR... (a run's --output-dir, or a "
                        "folder holding such run folders)")
    found = set()
    for path in map(Path, paths):
        if not path.exists():
            raise UserError(f"{path} does not exist: expected a run folder ({RunFolder.CONFIG} "
                            "in it)")
        subs = [s for s in path.iterdir() if s.is_dir() and _is_run(s)] if path.is_dir() else []
        if not _is_run(path) and not subs:
            raise UserError(f"{path} is not a run folder: expected {RunFolder.CONFIG} (or "
                            f"{RunFolder.LR_FIND}) in it or in its subfolders")
        found.update(s.resolve() for s in ([path] if _is_run(path) else subs))
    return sorted(found)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def load_runs(paths: list[str | Path]) -> list[RunDir]:
    """Read every run of :func:`find_runs`, named by its path below the folder that holds
    them all (so that two copies of a sweep in different places get the same names)."""
    dirs = find_runs(paths)
    base = Path(os.path.commonpath([d.parent for d in dirs]))
    runs = []
    for d in map(RunFolder, dirs):
        runs.append(RunDir(d.path.relative_to(base).as_posix(), flatten(d.read_config() or {}),
                           d.read_metrics(), d.read_results(), d.read_lr_find(), d.status()))
    return sorted(runs, key=lambda r: r.name)


def _value(v):
    # Lists (betas) as their JSON text: hashable, and shown as the config writes them.
    return json.dumps(v) if isinstance(v, (list, dict)) else v


def _order(v) -> tuple:
    # Numbers by value (1e-05 before 0.001), anything else by its text.
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    return (0, v, "") if number else (1, 0, json.dumps(v))


def _optimizer(run: RunDir) -> str:
    """The row's name: the optimizer's, and its schedule's where that is not the post's."""
    name, shape = optimizer_name(run.config.get("optim.name")), run.config.get("schedule.shape")
    return name if shape in (None, "post") else f"{name} + {shape}"


def split_fields(runs: list[RunDir]) -> tuple[list[str], list[str]]:
    """Config fields that differ between the trained runs, besides the optimizer, AMSGrad
    and :data:`RUN_LOCAL` ones: those constant within each optimizer row (they name the
    row) and the others (a table per combination of their values)."""
    trained = [r for r in runs if r.config]
    fields = sorted({k for r in trained for k in r.config} - RUN_LOCAL
                    - {"optim.name", "optim.amsgrad", "schedule.shape"})
    values = lambda k, rs: {_value(r.config.get(k)) for r in rs}
    varying = [k for k in fields if len(values(k, trained)) > 1]
    rows = [[r for r in trained if _optimizer(r) == o] for o in {_optimizer(r) for r in trained}]
    per_row = [k for k in varying if len(rows) > 1 and all(len(values(k, rs)) == 1 for rs in rows)]
    return per_row, [k for k in varying if k not in per_row]


def cells(runs: list[RunDir]) -> dict[TableCell, list[RunDir]]:
    """The trained runs grouped into cells, sorted: tables by their values, then Adam-L2,
    AdamW, other optimizers by name, without AMSGrad before with."""
    per_row, per_table = split_fields(runs)
    groups: dict[TableCell, list[RunDir]] = {}
    for r in runs:
        if r.config:
            cell = TableCell(tuple((k, _value(r.config.get(k))) for k in per_table),
                             _optimizer(r),
                             ", ".join(f"{k}={_value(r.config.get(k))}" for k in per_row),
                             bool(r.config.get("optim.amsgrad")))
            groups.setdefault(cell, []).append(r)
    rank = {name: i for i, name in enumerate(OPTIMIZERS.values())}
    key = lambda c: ([_order(v) for _, v in c.table], rank.get(c.optimizer, len(rank)),
                     c.optimizer, c.detail, c.amsgrad)
    return {c: groups[c] for c in sorted(groups, key=key)}


def main_metric(runs: list[RunDir], metric: str | None = None) -> str | None:
    """``metric``, or the first of :data:`~.post.MAIN_METRICS` the runs have (None:
    none yet)."""
    seen = {k for r in runs for k in [*(r.results or {}), *(k for row in r.rows for k in row)]}
    if metric is None:
        return default_metric(seen)
    if metric not in seen:
        have = sorted(seen - {"step", "stage", "epoch", "lr", "beta1", "momentum", "checkpoint"})
        raise UserError(f"--metric {metric} is in no run's {RunFolder.RESULTS} or "
                        f"{RunFolder.METRICS}; "
                        f"they have: {', '.join(have) or 'nothing yet'}")
    return metric


def mean_std(values: list[float]) -> str:
    """``mean ± sample std (n=K)``; one value has no spread to show."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4g} (n=1)"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g} (n={len(values)})"


def post_table(groups: dict[TableCell, list[RunDir]], key: str
               ) -> tuple[list[str], list[list[str]]]:
    """The post's layout of ``key`` from results.json: a row per optimizer, AMSGrad off/on."""
    by_cell = {(c.row, c.amsgrad): rs for c, rs in groups.items()}
    rows = list(dict.fromkeys(c.row for c in groups))
    return ["", "without AMSGrad", "with AMSGrad"], [
        [row] + [mean_std([r.results[key] for r in by_cell.get((row, ams), [])
                           if r.results and key in r.results]) for ams in (False, True)]
        for row in rows]


def runs_table(groups: dict[TableCell, list[RunDir]], key: str, wall_time: bool = True
               ) -> tuple[list[str], list[list[str]]]:
    """Per cell, over its finished runs: the final and best ``key`` of metrics.jsonl's eval
    rows, the mean wall time and the steps."""
    best = max if higher_is_better(key) else min
    header = ["cell", "finished", f"final {key}", f"best {key}"]
    header += ["wall time (s)"] * wall_time + ["steps"]
    rows = []
    for cell, runs in groups.items():
        done = [r for r in runs if r.status == FINISHED]
        evals = [v for v in ([row[key] for row in r.rows if key in row] for r in done) if v]
        walls = [r.results["wall_time_s"] for r in done if "wall_time_s" in r.results]
        steps = sorted({r.results.get("step", r.last_step) for r in done})
        rows.append([cell.label, f"{len(done)}/{len(runs)}", mean_std([v[-1] for v in evals]),
                     mean_std([best(v) for v in evals])]
                    + [f"{statistics.mean(walls):.1f}" if walls else "-"] * wall_time
                    + ["/".join(map(str, steps)) or "-"])
    return header, rows


def targets(runs: list[RunDir]) -> dict[str, float]:
    """The targets the finished runs were given (``--target``): metric -> value."""
    return {t["metric"]: t["value"] for r in runs if r.results and (t := r.results.get("target"))}


def reach(run: RunDir, target: Target) -> dict:
    """What ``--target`` records, read from the run's logged evaluations instead: the first
    that reaches ``target``, its epoch and training seconds (None: logged before they were)."""
    for row in run.rows:
        if target.metric in row and target.reached(row):
            return {"metric": target.metric, "value": target.value, "reached": True,
                    "epoch": row["epoch"], "train_seconds": row.get("train_seconds")}
    return {"metric": target.metric, "value": target.value, "reached": False}


def target_table(groups: dict[TableCell, list[RunDir]], target: Target | None = None
                 ) -> tuple[list[str], list[list[str]]]:
    """Time to target, the post's measure: per cell, how many finished runs reached their
    target (``target``, else each run's own ``--target``), and the epochs and training
    seconds it took those that did."""
    header = ["cell", "target", "reached", "epochs to target", "seconds to target"]
    rows = []
    for cell, runs in groups.items():
        done = [r for r in runs if r.status == FINISHED]
        got = [reach(r, target) for r in done] if target else \
            [r.results["target"] for r in done if "target" in r.results]
        if not got:
            continue
        hit = [t for t in got if t["reached"]]
        aims = sorted({f"{t['metric']} {'>=' if higher_is_better(t['metric']) else '<='} "
                       f"{t['value']:g}" for t in got})
        rows.append([cell.label, "; ".join(aims), f"{len(hit)} of {len(got)}",
                     mean_std([t["epoch"] for t in hit]),
                     mean_std([t["train_seconds"] for t in hit])
                     if all(t["train_seconds"] is not None for t in hit) else "-"])
    return header, rows


def series(runs: list[RunDir], key: str) -> Series:
    """What the plots draw: per cell label, each run's (name, steps, values) of ``key`` in
    metrics.jsonl, finished or not."""
    return {c.label: [(r.name, [row["step"] for row in r.rows if key in row],
                       [row[key] for row in r.rows if key in row]) for r in rs]
            for c, rs in cells(runs).items()}


def plot_series(path: Path, panels: list[tuple[str, Series]], markers: bool = False,
                target: float | None = None) -> Path:
    """One panel per (title, series): every run a thin line in its cell's colour; a dashed
    line at ``target`` (``--target``'s value) on the first panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (title, data) in zip(axes[0], panels):
        for i, (label, lines) in enumerate(data.items()):
            for j, (_, steps, values) in enumerate(lines):
                ax.plot(steps, values, "o-" if markers else "-", ms=3, lw=1, alpha=0.8,
                        color=f"C{i % 10}", label=label if j == 0 else None)
        if target is not None and ax is axes[0][0]:
            ax.axhline(target, color="k", ls="--", lw=1, label=f"target {target:g}")
        ax.set(title=title, xlabel="step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})  # no version: the same bytes
    plt.close(fig)
    return path


def _first_runs(data: Series) -> Series:
    return {label: lines[:1] for label, lines in data.items() if lines and lines[0][1]}


def _unfinished(groups: dict[TableCell, list[RunDir]]) -> list[str]:
    return [f"{r.name} ({c.label}): unfinished (last step {r.last_step})"
            for c, rs in groups.items() for r in rs if r.status != FINISHED]


def report(runs: list[RunDir], out: Path, metric: str | None = None,
           wall_time: bool = True, target: Target | None = None) -> Path:
    """Write ``out/report.md``, ``out/report.html`` and their PNGs; return report.md's path.
    ``target``: time to it from each run's logged evaluations (else each run's own)."""
    key = main_metric(runs, metric)  # a bad --metric before anything is written
    out.mkdir(parents=True, exist_ok=True)
    blocks = [("h1", f"Report of {len(runs)} runs"),
              *result_blocks(runs, key, wall_time, target),
              *curve_blocks(runs, key, out, target), *lr_find_blocks(runs, out)]
    (out / "report.md").write_text(to_markdown(blocks))
    (out / "report.html").write_text(to_html(blocks))
    return out / "report.md"


def result_blocks(runs: list[RunDir], key: str | None, wall_time: bool = True,
                  target: Target | None = None) -> Blocks:
    """Per table: the post's table of ``key`` and of each of :data:`EXTRA_METRICS` the
    runs have, then the runs table and the unfinished runs."""
    groups = cells(runs)
    if not groups:
        return []
    if key is None:
        return [("p", "No run has a validation metric yet."), ("ul", _unfinished(groups))]
    per_row, per_table = split_fields(runs)
    blocks: Blocks = [("p", f"Main metric: {key} ({'higher' if higher_is_better(key) else 'lower'}"
                       " is better). Cells: mean ± sample std over seeds of results.json; n "
                       "counts finished runs."
                       + (f" Each optimizer's own settings: {', '.join(per_row)}."
                          if per_row else "")
                       + (f" A table per value of: {', '.join(per_table)}." if per_table else ""))]
    for table in dict.fromkeys(c.table for c in groups):
        part = {c: rs for c, rs in groups.items() if c.table == table}
        blocks.append(("h2", ", ".join(f"{k}={v}" for k, v in table) or "All runs"))
        done = [r.results for rs in part.values() for r in rs if r.results]
        for k in [key] + [m for m in EXTRA_METRICS if m != key and any(m in d for d in done)]:
            blocks += [("h3", k), ("table", post_table(part, k))]
        blocks += [("h3", "Runs"), ("table", runs_table(part, key, wall_time))]
        if (reached := target_table(part, target))[1]:
            blocks += [("h3", "Time to target"), ("table", reached)]
        blocks.append(("ul", _unfinished(part)))
    return blocks


def curve_blocks(runs: list[RunDir], key: str | None, out: Path,
                 target: Target | None = None) -> Blocks:
    """Training loss, ``key`` and the schedule (lr, beta1 or momentum) against the step."""
    if not cells(runs) or key is None:
        return []
    mom = {**_first_runs(series(runs, "momentum")), **_first_runs(series(runs, "beta1"))}
    figures = [("train_loss.png", [("training loss", series(runs, "train_loss"))], False,
                "training loss per run"),
               ("valid_metric.png", [(key, series(runs, key))], True, f"{key} per run"),
               ("schedule.png", [("learning rate", _first_runs(series(runs, "lr"))),
                                 ("beta1 / momentum", mom)], False,
                "lr and beta1 of one run per cell")]
    blocks: Blocks = [("h2", "Curves")]
    line_at = target.value if target and target.metric == key else targets(runs).get(key)
    for name, panels, markers, alt in figures:
        # A metric only results.json has (tta_accuracy) has no curve to draw.
        if all(any(steps for lines in data.values() for _, steps, _ in lines)
               for _, data in panels):
            line = line_at if name == "valid_metric.png" else None
            blocks.append(("img", (plot_series(out / name, panels, markers, line).name, alt)))
    return blocks


def lr_find_blocks(runs: list[RunDir], out: Path) -> Blocks:
    """Each LR range test's curve (drawn by :func:`toolkit.lr_finder.plot`) and suggestions."""
    from toolkit import lr_finder  # here: it imports torch, seconds no other report needs

    found = [r for r in runs if r.lr_find]
    blocks: Blocks = [("h2", "LR range test")] if found else []
    for r in found:
        png = out / f"lr_find-{re.sub(r'[^A-Za-z0-9._-]', '_', r.name)}.png"
        lr_finder.plot(r.lr_find, png)
        picks = ", ".join(f"{k} {v:.3g}" for k, v in r.lr_find.get("suggestions", {}).items())
        blocks += [("h3", r.name), ("p", f"Suggested max lr: {picks or 'none'}."),
                   ("img", (png.name, f"LR range test of {r.name}"))]
    return blocks


def to_markdown(blocks: Blocks) -> str:
    cell = lambda s: str(s).replace("|", "\\|")
    parts = []
    for kind, body in blocks:
        if kind in ("h1", "h2", "h3"):
            parts.append("#" * int(kind[1]) + " " + body)
        elif kind == "p":
            parts.append(body)
        elif kind == "table":
            header, rows = body
            parts.append("\n".join("| " + " | ".join(map(cell, r)) + " |" for r in
                                   [header, ["---"] * len(header), *rows]))
        elif kind == "img":
            parts.append(f"![{body[1]}]({body[0]})")
        elif kind == "ul" and body:
            parts.append("\n".join(f"- {item}" for item in body))
    return "\n\n".join(parts) + "\n"


CSS = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
       "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
       "padding:.25em .6em;text-align:left}img{max-width:100%}")


def to_html(blocks: Blocks) -> str:
    e = html.escape
    parts = []
    for kind, body in blocks:
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{e(body)}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{e(body)}</p>")
        elif kind == "table":
            header, rows = body
            parts.append("<table>\n<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>\n"
                         + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>\n"
                                   for r in rows) + "</table>")
        elif kind == "img":
            parts.append(f'<p><img src="{e(body[0])}" alt="{e(body[1])}"></p>')
        elif kind == "ul" and body:
            parts.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in body) + "</ul>")
    title = e(blocks[0][1])
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{CSS}</style></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="toolkit report",
        description=f"The post's table ({' / '.join(OPTIMIZERS.values())} x AMSGrad, mean ± "
                    "std over seeds) and "
                    "plots of a set of runs, as report.md and report.html.")
    parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR",
                        help="a run's --output-dir, or a folder of them (a sweep's --out)")
    parser.add_argument("--out", default="report", help="folder to write to (default report/)")
    parser.add_argument("--metric", help="results.json key of the table (default: "
                        f"the first present of {', '.join(MAIN_METRICS)})")
    parser.add_argument("--target", metavar="METRIC=VALUE", help="time to this target from "
                        "each run's logged evaluations (default: each run's own --target)")
    parser.add_argument("--no-wall-time", action="store_true",
                        help="leave out the wall time, the one thing two equal runs differ in")
    ns = parser.parse_args(argv)
    try:
        target = Target.parse(ns.target) if ns.target else None
    except ValueError as e:
        raise UserError(str(e)) from None
    print(report(load_runs(ns.run_dirs), Path(ns.out), ns.metric, not ns.no_wall_time, target))
