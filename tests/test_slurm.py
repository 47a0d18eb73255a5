"""The ``slurm/`` scripts on a real Slurm (two nodes on loopback, tests/slurm_cluster.py):
a 2-process ZeRO-2 job and an FSDP2 one, a job signalled as a preemption warns it
(checkpoint, requeue, resume) that ends bitwise where an uninterrupted job does, a job array of the post's grid
that a re-submission does not redo, a 2-node job equal to a 1-node one, and a node whose
processes die: the other rank exits within a bounded time and a resubmission resumes."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT

pytestmark = [pytest.mark.slurm]
TRAIN, GRID = ROOT / "slurm" / "train.sbatch", ROOT / "slurm" / "grid.sbatch"
SHORT = "--epochs 2 --checkpoint-every 11"  # 44 steps of digits


def submit(cluster, script: Path, out: Path, *sbatch_args: str, **env: str) -> str:
    env = {"TOOLKIT_DIR": str(ROOT), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT), "OUTPUT_DIR": str(out), **env}
    return cluster.sbatch(script, "-o", f"{out}.log", *sbatch_args, env=env)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    step = json.loads((run / "results.json").read_text())["step"]
    return load_file(run / "checkpoints" / f"step_{step}" / "model.safetensors")


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def train_rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if '"train_loss"' in x]


@pytest.fixture(scope="module")
def one_node(slurm, tmp_path_factory) -> Path:
    """The reference: 2 processes on one node, DDP."""
    out = tmp_path_factory.mktemp("slurm") / "one-node"
    job = submit(slurm, TRAIN, out, ARGS=SHORT)
    assert slurm.wait(job, 300) == ("COMPLETED", "0:0"), Path(f"{out}.log").read_text()
    return out


@pytest.mark.parametrize("name, kind", [
    ("zero2", "DEEPSPEED"), pytest.param("fsdp2", "MULTI_CPU", marks=pytest.mark.slow)])
def test_a_sharded_job_completes_with_its_outputs(name, kind, slurm, tmp_path):
    out = tmp_path / name
    job = submit(slurm, TRAIN, out, ARGS=SHORT, STRATEGY=name)
    assert slurm.wait(job, 300) == ("COMPLETED", "0:0")
    log = Path(f"{out}.log").read_text()
    assert f"on 2 process(es), {kind} ({name})" in log and "toolkit: finished" in log
    assert json.loads((out / "results.json").read_text())["step"] == 44
    assert (out / "config.json").is_file() and len(train_rows(out)) > 0


def test_two_nodes_train_like_one(slurm, one_node, tmp_path):
    out = tmp_path / "two-nodes"
    job = submit(slurm, TRAIN, out, "-N", "2", "--ntasks-per-node=1", ARGS=SHORT)
    assert slurm.wait(job, 300) == ("COMPLETED", "0:0")
    log = Path(f"{out}.log").read_text()
    assert "2 process(es) on n[1-2]" in log
    assert_same(final_weights(one_node), final_weights(out))


def test_preemption_warning_checkpoints_requeues_and_resumes_exactly(slurm, tmp_path):
    """USR1 to the batch script (as ``--signal=B:USR1@T`` sends it): every rank saves at
    the next step and exits 75, the job requeues itself, and its second attempt resumes and
    ends with the weights of a job nobody interrupted."""
    args = "--epochs 30"  # 660 steps: seconds of training left after the signal
    reference, out = tmp_path / "reference", tmp_path / "preempted"
    ref_job = submit(slurm, TRAIN, reference, ARGS=args)
    job = submit(slurm, TRAIN, out, ARGS=args)
    deadline = time.monotonic() + 120
    while not any(r["step"] >= 20 for r in train_rows(out)):
        assert time.monotonic() < deadline, Path(f"{out}.log").read_text()
        time.sleep(0.1)
    started = time.monotonic()
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    assert slurm.wait(job, 300) == ("COMPLETED", "0:0")
    requeue_s = time.monotonic() - started
    log = Path(f"{out}.log").read_text()  # appended across attempts (--open-mode=append)
    assert "got SIGUSR1" in log and "received SIGUSR1: saved" in log, log
    assert "requeueing job" in log and "attempt 2" in log and "resumed from" in log, log
    assert slurm.job(job)["Restarts"] == "1"
    assert slurm.wait(ref_job, 300) == ("COMPLETED", "0:0")
    assert_same(final_weights(reference), final_weights(out))
    print(f"signal to requeued job's end: {requeue_s:.1f} s")


def test_a_bad_input_job_is_not_requeued(slurm, tmp_path):
    out = tmp_path / "bad"
    job = submit(slurm, TRAIN, out, ARGS="--optim.lr -1")
    assert slurm.wait(job, 120) == ("FAILED", "2:0")
    log = Path(f"{out}.log").read_text()
    assert "bad input" in log and "requeue" not in log.replace("not requeued", "")
    assert slurm.job(job)["Restarts"] == "0"


@pytest.mark.slow  # 32 s: CI runs it after the default run (test_sweep's array test stays)
def test_grid_array_one_folder_per_cell_and_a_resubmission_skips_them(slurm, tmp_path):
    grid = tmp_path / "grid"
    env = {"GRID_DIR": str(grid), "SEEDS": "0", "ARGS": "--max-steps 6"}
    job = submit(slurm, GRID, grid, "--array=0-3", **env)
    for i in range(4):
        assert slurm.wait(f"{job}_{i}", 300) == ("COMPLETED", "0:0")
    cells = sorted(p.name for p in grid.iterdir() if p.is_dir())
    assert cells == ["adam-l2-amsgrad-seed0", "adam-l2-seed0", "adamw-amsgrad-seed0",
                     "adamw-seed0"]
    for cell in cells:
        config = json.loads((grid / cell / "config.json").read_text())
        assert config["optim"]["name"] == ("adamw" if cell.startswith("adamw") else "adam")
        assert config["optim"]["amsgrad"] == ("amsgrad" in cell)
    done = {c: (grid / c / "results.json").stat().st_mtime_ns for c in cells}
    (grid / "adamw-seed0" / "results.json").unlink()  # as if that cell had been interrupted
    again = submit(slurm, GRID, grid, "--array=0-3", **env)
    for i in range(4):
        assert slurm.wait(f"{again}_{i}", 300) == ("COMPLETED", "0:0")
    for cell in cells:
        if cell != "adamw-seed0":
            assert (grid / cell / "results.json").stat().st_mtime_ns == done[cell], cell
    assert (grid / "adamw-seed0" / "results.json").is_file()


def worker_pids(run: Path, node: str) -> list[int]:
    """This run's worker processes that Slurm started on ``node``."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if not d.name.isdigit() or str(run) not in (d / "cmdline").read_text():
                continue
            environ = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SLURMD_NODENAME={node}".encode() in environ and b"RANK=1" in environ:
            pids.append(int(d.name))
    return pids


def wait_for_checkpoint(run: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (run / "checkpoints" / f"step_{step}" / "COMMITTED").is_file():
        assert time.monotonic() < deadline, Path(f"{run}.log").read_text()
        time.sleep(0.1)


def fault_node_two(slurm, out: Path, sig: int, args: str, step: int, **env: str):
    """Start a 2-node job, send ``sig`` to its worker on n2 once checkpoint ``step`` is
    committed; (state, exit code, seconds from the signal to the job's end, its log)."""
    job = submit(slurm, TRAIN, out, "-N", "2", "--ntasks-per-node=1", ARGS=args, **env)
    wait_for_checkpoint(out, step)
    victims = worker_pids(out, "n2")
    assert victims, "no worker of the job found on n2"
    sent = time.monotonic()
    for pid in victims:
        os.kill(pid, sig)
    state, code = slurm.wait(job, 120)
    seconds = time.monotonic() - sent
    assert not worker_pids(out, "n1") and not worker_pids(out, "n2")
    assert slurm.job(job)["Restarts"] == "0"
    return state, code, seconds, Path(f"{out}.log").read_text()


@pytest.mark.slow  # 18 s: CI runs it after the default run
def test_a_silent_node_ends_the_job_after_the_timeout(slurm, tmp_path):
    """A node that stops answering (its worker SIGSTOPped: sockets open, nothing sent): the
    other rank gives up after --dist-timeout seconds with one error line, and srun ends the
    silent task TASK_WAIT seconds later."""
    state, code, exit_s, log = fault_node_two(
        slurm, tmp_path / "silent", signal.SIGSTOP, "--epochs 60 --checkpoint-every 40 "
        "--dist-timeout 8", 40, TASK_WAIT="3")
    assert state == "FAILED", (state, code)
    assert "error: lost contact with another process of this run" in log, log
    assert 8 <= exit_s < 8 + 3 + 30, exit_s
    print(f"a silent node: the job ended {exit_s:.1f} s after (--dist-timeout 8, TASK_WAIT 3)")


@pytest.mark.slow  # 32 s: CI runs it after the default run
def test_a_dead_node_ends_the_job_and_a_resubmission_resumes(slurm, tmp_path):
    out = tmp_path / "node-dies"
    args = "--epochs 60 --checkpoint-every 40 --dist-timeout 60"
    state, code, exit_s, log = fault_node_two(slurm, out, signal.SIGKILL, args, 80)
    assert state == "FAILED" and code != "0:0", (state, code)
    assert "failed with exit code" in log and "requeueing" not in log, log
    assert "error: lost contact with another process of this run" in log, log
    print(f"the surviving rank's job ended {exit_s:.1f} s after its peer was killed")
    again = submit(slurm, TRAIN, out, "-N", "2", "--ntasks-per-node=1", ARGS=args)
    assert slurm.wait(again, 300) == ("COMPLETED", "0:0")
    log = Path(f"{out}.log").read_text()
    assert "resumed from" in log, log
    assert json.loads((out / "results.json").read_text())["step"] == 60 * 22
