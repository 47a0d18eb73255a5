"""``toolkit sweep``: the post's grid and any field's values as cells with readable names,
run one after another (one process or torchrun's two) or as a Slurm job array; finished
cells skipped, an interrupted one resumed, a failed one reported while the others run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, env
from toolkit.errors import UserError
from toolkit.experiments.sweep import cells

DIGITS = "recipes/digits.py"


def sweep(*args: str, check: bool = True, **extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "toolkit.cli", "sweep", *args], cwd=ROOT,
                          env=env(**extra), capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_cells_are_the_product_in_a_fixed_order():
    grid = cells("post", [0, 1], ["optim.wd=1e-4,1e-3"], adam_l2_args="--preset adam-l2")
    assert len(grid) == 4 * 2 * 2
    assert grid[0].name == "adam-l2-wd1e-4-seed0"
    assert grid[0].args == ("--preset", "adam-l2", "--optim.no-amsgrad", "--optim.wd", "1e-4",
                            "--seed", "0")
    assert [c.name for c in grid[::4]] == ["adam-l2-wd1e-4-seed0", "adamw-wd1e-4-seed0",
                                           "adam-l2-amsgrad-wd1e-4-seed0",
                                           "adamw-amsgrad-wd1e-4-seed0"]
    assert len({c.name for c in grid}) == len(grid)
    assert [c.name for c in cells(None, [3], ["epochs=2,3"])] == ["epochs2-seed3",
                                                                  "epochs3-seed3"]
    for bad in (["optim.wd"], ["=1,2"], ["optim.wd="]):
        with pytest.raises(UserError, match="FIELD=V1,V2"):
            cells(None, [0], bad)
    with pytest.raises(UserError, match="twice"):
        cells(None, [0, 0], [])


def test_a_failed_cell_is_reported_and_the_others_run(tmp_path):
    out = tmp_path / "sweep"
    proc = sweep(DIGITS, "--out", str(out), "--vary", "optim.lr=1e-2,-1", "--",
                 "--max-steps", "4", check=False)
    assert proc.returncode == 1
    assert "lr-1-seed0: failed with exit code 2" in proc.stdout
    assert "1 of 2 cells finished; failed: lr-1-seed0" in proc.stdout
    assert (out / "lr1e-2-seed0" / "results.json").is_file()
    assert "error: lr=-1.0 must be > 0" in (out / "lr-1-seed0.log").read_text()
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["lr-1-seed0"] == {"status": "failed", "exit_code": 2,
                                     "seconds": summary["lr-1-seed0"]["seconds"]}
    again = sweep(DIGITS, "--out", str(out), "--vary", "optim.lr=1e-2,-1", "--",
                  "--max-steps", "4", check=False)
    assert "lr1e-2-seed0: finished, skipped" in again.stdout


def test_cells_under_torchrun(tmp_path):
    out = tmp_path / "sweep"
    sweep(DIGITS, "--out", str(out), "--launcher", "torchrun", "--nproc", "2",
          "--seeds", "0", "1", "--", "--max-steps", "4")
    for seed in (0, 1):
        assert "on 2 process(es)" in (out / f"seed{seed}.log").read_text()
        config = json.loads((out / f"seed{seed}" / "config.json").read_text())
        assert config["train"]["seed"] == seed


def cell_pids(out: Path) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and str(out) in (d / "cmdline").read_text():
                pids.append(int(d.name))
        except OSError:
            pass
    return pids


GRID = ["--grid", "post", "--seeds", "0", "1", "2", "--adam-l2-args=--preset adam-l2", "--",
        "--epochs", "2", "--checkpoint-every", "15"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "whole"
    sweep(DIGITS, "--out", str(out), *GRID)
    return out


@pytest.mark.slow  # the 12-cell grid twice: ~4 minutes on 2 cores
def test_the_post_grid_of_digits_one_folder_per_cell(whole):
    folders = sorted(p.name for p in whole.iterdir() if p.is_dir())
    assert len(folders) == 12 and "adamw-amsgrad-seed2" in folders
    for name in folders:
        config = json.loads((whole / name / "config.json").read_text())
        assert config["optim"]["name"] == ("adamw" if name.startswith("adamw") else "adam")
        assert config["optim"]["amsgrad"] == ("amsgrad" in name)
        assert config["train"]["seed"] == int(name[-1])
        assert json.loads((whole / name / "results.json").read_text())["step"] == 44


@pytest.mark.slow  # the 12-cell grid twice: ~4 minutes on 2 cores
def test_a_sweep_killed_midway_finishes_only_what_is_missing(whole, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "sweep", DIGITS, "--out",
                             str(out), *GRID], cwd=ROOT, env=env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    victim = out / "adam-l2-amsgrad-seed0"  # the 7th cell, killed after its first checkpoint
    deadline = time.monotonic() + 600
    while not (victim / "checkpoints" / "step_15" / "COMMITTED").is_file():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and the cell it runs
    proc.wait()
    deadline = time.monotonic() + 10
    while cell_pids(out) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not cell_pids(out), "a process of the killed sweep is still alive"
    assert not (victim / "results.json").exists()
    again = sweep(DIGITS, "--out", str(out), *GRID)
    lines = again.stdout.splitlines()
    assert sum("finished, skipped" in x for x in lines) == 6
    assert any("adam-l2-amsgrad-seed0: resuming" in x for x in lines)
    assert sum(": starting" in x for x in lines) == 5
    assert "resumed from" in (out / "adam-l2-amsgrad-seed0.log").read_text()
    for name in (p.name for p in whole.iterdir() if p.is_dir()):
        a = json.loads((whole / name / "results.json").read_text())
        b = json.loads((out / name / "results.json").read_text())
        for key in ("valid_accuracy", "valid_loss", "train_loss", "step"):
            assert a.get(key) == b.get(key), (name, key)
    # Its report is the uninterrupted sweep's (wall times aside: they are measured).
    reports = []
    for sweep_dir in (whole, out):
        rep = tmp_path / f"report-{sweep_dir.name}"
        subprocess.run([sys.executable, "-m", "toolkit.cli", "report", str(sweep_dir), "--out",
                        str(rep), "--no-wall-time"], cwd=ROOT, env=env(), check=True,
                       capture_output=True)
        reports.append((rep / "report.md").read_text())
    assert reports[0] == reports[1]


@pytest.mark.slow  # the 12-cell grid twice: ~4 minutes on 2 cores
def test_the_report_of_the_grid_has_the_posts_table_and_plots(whole, tmp_path):
    from statistics import mean, stdev

    from PIL import Image

    rep = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "toolkit.cli", "report", str(whole), "--out",
                           str(rep)], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = (rep / "report.md").read_text()
    for optim, row in (("adamw", "AdamW"), ("adam-l2", "Adam-L2")):
        line = next(x for x in text.splitlines() if x.startswith(f"| {row} ("))
        for cell, suffix in zip(line.split("|")[2:4], ("", "-amsgrad")):
            acc = [json.loads((whole / f"{optim}{suffix}-seed{s}" / "results.json").read_text())
                   ["valid_accuracy"] for s in range(3)]
            assert f"{mean(acc):.4g} ± {stdev(acc):.2g} (n=3)" in cell, (cell, acc)
    for png in ("train_loss.png", "valid_metric.png", "schedule.png"):
        with Image.open(rep / png) as im:
            assert im.size[0] >= 400 and len(set(im.convert("RGB").getdata())) > 10, png


@pytest.mark.slurm
def test_a_sweep_as_a_slurm_job_array(slurm, tmp_path):
    out = tmp_path / "array"
    args = [DIGITS, "--out", str(out), "--vary", "optim.wd=1e-3,1e-2", "--slurm",
            "--sbatch-args=--ntasks-per-node=1", "--", "--max-steps", "4"]
    proc = subprocess.run([sys.executable, "-m", "toolkit.cli", "sweep", *args], cwd=ROOT,
                          env={**env(), **slurm.env}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = proc.stdout.split("submitted job array ")[1].split(":")[0]
    for i in range(2):
        assert slurm.wait(f"{job}_{i}", 300) == ("COMPLETED", "0:0")
    for name, wd in (("wd1e-3-seed0", 1e-3), ("wd1e-2-seed0", 1e-2)):
        assert json.loads((out / name / "config.json").read_text())["optim"]["wd"] == wd
        assert (out / name / "results.json").is_file()
