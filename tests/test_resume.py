"""Real interruptions: a run killed (SIGKILL) or stopped (SIGTERM/SIGUSR1) mid-epoch and
resumed equals the uninterrupted run bitwise, dropout RNG and data order included."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import ROOT, TINY, command, dumps, env, launch

ARGS = ["--dropout", "0.3", "--epochs", "3", "--checkpoint-every", "1", "--keep-checkpoints", "3"]


def reference(tmp: Path, launcher: str) -> dict:
    launch(TINY, [*ARGS, "--output-dir", str(tmp / "ref"), "--dump", str(tmp / "ref_dump")],
           launcher=launcher)
    return dumps(tmp / "ref_dump", 1)[0]


def start(run: Path, launcher: str) -> subprocess.Popen:
    """A slowed-down run (0.4 s per step) in its own process group."""
    return subprocess.Popen(command(TINY, [*ARGS, "--output-dir", str(run), "--step-sleep", "0.4"],
                                    launcher), cwd=ROOT, env=env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{proc.stdout.read()}\n{proc.stderr.read()}")
        if time.time() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.05)


def assert_same_params(a: dict, b: dict) -> None:
    for k, v in a["params"].items():
        assert torch.equal(v, b["params"][k]), f"{k} differs after resume"


def latest_step(run: Path) -> int:
    return max(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_kill_mid_epoch_and_resume_is_exact(launcher, tmp_path):
    ref = reference(tmp_path, launcher)
    run = tmp_path / "run"
    proc = start(run, launcher)
    wait_for(run / "checkpoints" / "step_14" / "COMMITTED", proc)  # epoch 2 of 3, step 4 of 10
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = latest_step(run)
    assert 14 <= killed_at < 20  # mid-epoch
    resumed = launch(TINY, [*ARGS, "--output-dir", str(run), "--resume", "auto",
                            "--dump", str(tmp_path / "dump")], launcher=launcher)
    assert f"resumed from {run / 'checkpoints'}" in resumed.stdout
    assert_same_params(dumps(tmp_path / "dump", 1)[0], ref)


def test_sigterm_saves_at_step_boundary_and_exits_zero(tmp_path):
    ref = reference(tmp_path, "python")
    run = tmp_path / "run"
    proc = start(run, "python")
    wait_for(run / "checkpoints" / "step_5" / "COMMITTED", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "received SIGTERM" in out and "--resume auto" in out
    stopped = latest_step(run)
    assert 5 <= stopped < 30
    launch(TINY, [*ARGS, "--output-dir", str(run), "--resume", "auto",
                  "--dump", str(tmp_path / "dump")])
    assert_same_params(dumps(tmp_path / "dump", 1)[0], ref)


def test_sigusr1_to_one_rank_stops_every_rank(tmp_path):
    """The stop is a collective decision: a signal to rank 1 alone saves on both ranks."""
    ref = reference(tmp_path, "torchrun")
    run = tmp_path / "run"
    proc = start(run, "torchrun")
    wait_for(run / "checkpoints" / "step_3" / "COMMITTED", proc)
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
               if "tiny.py" in " ".join(c.cmdline())]
    rank1 = next(w for w in workers if w.environ().get("RANK") == "1")
    rank1.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "received" in out and "--resume auto" in out
    assert latest_step(run) < 30
    launch(TINY, [*ARGS, "--output-dir", str(run), "--resume", "auto",
                  "--dump", str(tmp_path / "dump")], launcher="torchrun")
    assert_same_params(dumps(tmp_path / "dump", 1)[0], ref)
