"""``toolkit sweep --grid contenders``: each contender takes the lr whose tuning run ended
best (in the metric's direction; a failed or NaN run is worst), every seed then runs at it
(the tuning run at that lr reused), and the report has one row per contender with its time
to target; bad input is one line."""

from __future__ import annotations

import json
import math

import pytest

from report_runs import write_run
from test_report import tables
from test_sweep import sweep
from toolkit.errors import UserError
from toolkit.experiments import contenders

LRS = ["1e-3", "3e-3", "1e-2"]
GRIDS = {name: LRS for name in contenders.CONTENDERS}


def fake_tuning(out, metric, values):
    """Tuning runs of every contender ending at ``values[name][i]`` at ``LRS[i]`` (None:
    a run that failed before its results)."""
    for name, ends in values.items():
        for lr, end in zip(LRS, ends):
            folder = out / contenders.cell(name, lr, 0)[0]
            write_run(folder, evals=(end if end is not None else 0.5,), metric=metric,
                      finished=end is not None)


def test_each_contender_takes_its_best_lr(tmp_path):
    values = {"adamw-post": (0.5, 0.9, 0.7), "adamw-fastai": (0.95, 0.9, 0.1),
              "adamw-wsd": (0.2, None, 0.3), "schedulefree": (math.nan, 0.4, None),
              "muon": (0.6, 0.6, 0.61)}
    fake_tuning(tmp_path, "valid_accuracy", values)
    chosen = contenders.choose(tmp_path, GRIDS, 0)
    assert chosen == {"adamw-post": "3e-3", "adamw-fastai": "1e-3", "adamw-wsd": "1e-2",
                      "schedulefree": "3e-3", "muon": "1e-2"}
    table = json.loads((tmp_path / "contenders.json").read_text())
    assert table["adamw-wsd"]["by_lr"] == {"1e-3": 0.2, "3e-3": None, "1e-2": 0.3}
    assert table["muon"] == {"metric": "valid_accuracy", "lr": "1e-2",
                             "by_lr": {"1e-3": 0.6, "3e-3": 0.6, "1e-2": 0.61}}


def test_a_grid_grows_past_an_edge_that_won():
    grids = {"a": ["1e-3", "3e-3"], "b": ["1e-3", "3e-3", "1e-2"], "c": ["1e-3", "3e-3"],
             "d": ["5e-3"]}
    assert contenders.extend(grids, {"a": "3e-3", "b": "3e-3", "c": "1e-3", "d": "5e-3"})
    assert grids == {"a": ["1e-3", "3e-3", "0.009"], "b": ["1e-3", "3e-3", "1e-2"],
                     "c": ["0.000333", "1e-3", "3e-3"], "d": ["5e-3"]}
    assert not contenders.extend(grids, {"b": "3e-3", "d": "5e-3"})


def test_perplexity_is_lower_is_better(tmp_path):
    fake_tuning(tmp_path, "valid_ppl", {name: (150.0, 120.0, 300.0)
                                        for name in contenders.CONTENDERS})
    assert set(contenders.choose(tmp_path, GRIDS, 0).values()) == {"3e-3"}


def test_a_contender_without_a_finished_run_is_one_line(tmp_path):
    values = {name: (0.5, 0.6, 0.7) for name in contenders.CONTENDERS}
    fake_tuning(tmp_path, "valid_accuracy", {**values, "muon": (None, None, None)})
    with pytest.raises(UserError, match="contender muon: no tuning run finished"):
        contenders.choose(tmp_path, GRIDS, 0)


@pytest.mark.parametrize("lrs", [None, "", "1e-3,x", "1e-3,-1", "1e-3,1e-3", "inf",
                                 "1e-3,0.001"])
def test_bad_lrs_are_one_line(lrs):
    with pytest.raises(UserError, match="--lrs"):
        contenders.parse_lrs(lrs)


@pytest.mark.slow  # 44 s: CI runs it after the default run
def test_contenders_in_one_command(tmp_path):
    """tiny, one lr each, 2 seeds: the seed-0 tuning run is its final run, seed 1 runs at it, and
    the report's table and time to target have a row per contender."""
    out = tmp_path / "c"
    proc = sweep("tests/tiny.py", "--out", str(out), "--grid", "contenders", "--lrs",
                 "1e-2", "--seeds", "0", "1", "--", "--target", "valid_accuracy=0.5")
    assert "each contender's lr: adamw-post 1e-2, adamw-fastai 1e-2" in proc.stdout
    assert proc.stdout.count("-seed0: finished, skipped") == 5
    assert "sweep " + str(out) + ": 10 of 10 cells finished" in proc.stdout
    config = json.loads((out / "muon-lr1e-2-seed1" / "config.json").read_text())
    assert (config["optim"]["name"], config["train"]["seed"]) == ("muon", 1)
    got = tables((out / "report" / "report.md").read_text())
    rows = {r[""]: r for r in got["All runs / valid_accuracy"]}
    assert [r.split(" (")[0] for r in rows] == [
        "AdamW", "AdamW + fastai", "AdamW + wsd", "Muon", "Schedule-free AdamW + constant"]
    assert all(r["without AMSGrad"].endswith("(n=2)") for r in rows.values())
    reached = got["All runs / Time to target"]
    assert len(reached) == 5 and all(r["target"] == "valid_accuracy >= 0.5" for r in reached)


def test_contenders_refuse_vary(tmp_path):
    proc = sweep("tests/tiny.py", "--out", str(tmp_path), "--grid", "contenders",
                 "--lrs", "1e-2", "--vary", "optim.wd=0,1", check=False)
    assert proc.returncode == 2
    assert "--grid contenders takes no --vary" in proc.stderr.strip().splitlines()[-1]
