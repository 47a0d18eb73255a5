"""Real interruptions: a run killed (SIGKILL, every process of it, at random moments) or
stopped (SIGTERM/SIGUSR1) mid-epoch and resumed equals the uninterrupted run bitwise, dropout
RNG and data order included; a full disk mid-save is one line and loses nothing; a second
run in the same folder is refused; workers whose launcher died stop."""

from __future__ import annotations

import json
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import DIGITS, ROOT, TINY, command, dumps, env, launch
from toolkit.checkpoint import check, list_checkpoints

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


def run_processes(proc: subprocess.Popen) -> list[psutil.Process]:
    """The launcher and every process under it (torchrun's workers sit in sessions of their
    own, so its process group does not hold them)."""
    root = psutil.Process(proc.pid)
    return [root, *root.children(recursive=True)]


def kill_all(procs: list[psutil.Process]) -> None:
    """SIGKILL every process and assert that none of them is left."""
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    gone, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, f"still alive after SIGKILL: {alive}"


def kill_after(run: Path, args: list[str], launcher: str, step: int) -> None:
    """Start ``tiny`` with ``args`` slowed down (0.4 s a step), SIGKILL every process of it
    once checkpoint ``step`` is committed, and assert that none is left."""
    proc = subprocess.Popen(command(TINY, [*args, "--output-dir", str(run), "--step-sleep",
                                           "0.4"], launcher), cwd=ROOT, env=env(),
                            start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(run / "checkpoints" / f"step_{step}" / "COMMITTED", proc)
    procs = run_processes(proc)
    assert len(procs) == (3 if launcher == "torchrun" else 1)
    kill_all(procs)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()


def killed_tiny_resumes_exactly(tmp: Path, flags: list[str]) -> None:
    """3 epochs of ``tiny`` with ``flags`` and dropout, SIGKILLed at checkpoint 14, then
    ``--resume auto``: its weights equal an uninterrupted run's bitwise."""
    args = [*flags, "--dropout", "0.3", "--epochs", "3", "--checkpoint-every", "1",
            "--keep-checkpoints", "3"]
    launch(TINY, [*args, "--output-dir", str(tmp / "ref"), "--dump", str(tmp / "r")])
    kill_after(tmp / "run", args, "python", 14)
    proc = launch(TINY, [*args, "--output-dir", str(tmp / "run"), "--resume", "auto",
                         "--dump", str(tmp / "d")])
    assert "resumed from" in proc.stdout
    a, b = dumps(tmp / "d", 1)[0], dumps(tmp / "r", 1)[0]
    for k, v in b["params"].items():
        assert torch.equal(a["params"][k], v), k


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_kill_mid_epoch_and_resume_is_exact(launcher, tmp_path):
    ref = reference(tmp_path, launcher)
    run = tmp_path / "run"
    proc = start(run, launcher)
    wait_for(run / "checkpoints" / "step_14" / "COMMITTED", proc)  # epoch 2 of 3, step 4 of 10
    procs = run_processes(proc)
    assert len(procs) == (3 if launcher == "torchrun" else 1)
    kill_all(procs)
    proc.wait()
    killed_at = latest_step(run)
    assert 14 <= killed_at < 20  # mid-epoch
    resumed = launch(TINY, [*ARGS, "--output-dir", str(run), "--resume", "auto",
                            "--dump", str(tmp_path / "dump")], launcher=launcher)
    assert f"resumed from {run / 'checkpoints' / f'step_{killed_at}'}" in resumed.stdout
    assert_same_params(dumps(tmp_path / "dump", 1)[0], ref)


@pytest.mark.slow  # 43 s: CI runs it after the default run (kill_mid_epoch kills by default)
def test_kill_at_random_moments_then_resume_is_exact(tmp_path, kills: int = 5):
    """SIGKILL at random moments of a run that checkpoints and prunes every step (so most
    kills land in a save or a prune): each time every visible checkpoint is sound, the
    newest resumes, and the run ends equal to an uninterrupted one."""
    args = ["--dropout", "0.3", "--epochs", "8", "--checkpoint-every", "1",
            "--keep-checkpoints", "2"]
    launch(TINY, [*args, "--output-dir", str(tmp_path / "ref"), "--dump", str(tmp_path / "ref")])
    ref = dumps(tmp_path / "ref", 1)[0]
    run, rng = tmp_path / "run", random.Random(0)
    for i in range(kills):
        proc = subprocess.Popen(
            command(TINY, [*args, "--output-dir", str(run), "--step-sleep", "0.02",
                           *(["--resume", "auto"] if i else [])]),
            cwd=ROOT, env=env(), start_new_session=True, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        found = list_checkpoints(run / "checkpoints")
        before = found[-1][0] if found else 0
        deadline = time.time() + 120
        while not (found := list_checkpoints(run / "checkpoints")) or found[-1][0] <= before:
            assert proc.poll() is None, proc.stderr.read()  # 80 steps: it never ends here
            assert time.time() < deadline
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))
        assert proc.poll() is None, f"run {i} ended before the kill"
        kill_all(run_processes(proc))
        proc.wait()
        found = list_checkpoints(run / "checkpoints")
        assert found, "no committed checkpoint left"
        for _, path in found:
            assert check(path) is None, check(path)
    launch(TINY, [*args, "--output-dir", str(run), "--resume", "auto",
                  "--dump", str(tmp_path / "dump")])
    assert_same_params(dumps(tmp_path / "dump", 1)[0], ref)


def test_second_run_in_the_same_folder_is_refused(tmp_path):
    run = tmp_path / "run"
    first = start(run, "torchrun")
    wait_for(run / "checkpoints" / "step_2" / "COMMITTED", first)
    holder = next(p for p in run_processes(first)[1:] if p.environ().get("RANK") == "0")
    second = launch(TINY, [*ARGS, "--output-dir", str(run), "--resume", "auto"], check=False)
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert "is in use by another run" in lines[0]
    assert f"pid {holder.pid} on {socket.gethostname()}" in lines[0]
    out, err = first.communicate(timeout=240)
    assert first.returncode == 0, err  # the first run was not disturbed


def test_workers_stop_when_their_launcher_dies(tmp_path):
    ref = reference(tmp_path, "torchrun")
    run = tmp_path / "run"
    proc = start(run, "torchrun")
    wait_for(run / "checkpoints" / "step_3" / "COMMITTED", proc)
    workers = run_processes(proc)[1:]
    assert len(workers) == 2
    psutil.Process(proc.pid).kill()  # the launcher alone (an OOM-killed agent)
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"workers trained on without their launcher: {alive}"
    assert "the launcher" in proc.stderr.read()
    launch(TINY, [*ARGS, "--output-dir", str(run), "--resume", "auto",
                  "--dump", str(tmp_path / "dump")], launcher="torchrun")
    assert_same_params(dumps(tmp_path / "dump", 1)[0], ref)


@pytest.fixture
def small_disk(tmp_path):
    """A real 200 KiB file system (tmpfs): room for about three tiny checkpoints."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_disk_full_mid_save_is_one_line_and_loses_nothing(tmp_path, small_disk):
    args = ["--max-steps", "12", "--checkpoint-every", "2", "--keep-checkpoints", "3"]
    launch(TINY, [*args, "--output-dir", str(tmp_path / "ref"), "--dump", str(tmp_path / "ref")])
    run = small_disk / "run"
    proc = launch(TINY, [*args, "--output-dir", str(run)], check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    free = shutil.disk_usage(small_disk).free
    assert lines[0].startswith(f"error: disk full: saving a checkpoint in {run / 'checkpoints'}")
    assert "bytes are free" in lines[0] and "needs about" in lines[0]
    found = list_checkpoints(run / "checkpoints")
    assert found and all(check(p) is None for _, p in found)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [p.name for _, p in found]
    assert free < found[-1][1].stat().st_size + 64 * 1024  # it really was full
    subprocess.run(["mount", "-o", "remount,size=2m", str(small_disk)], check=True)
    launch(TINY, [*args, "--output-dir", str(run), "--resume", "auto",
                  "--dump", str(tmp_path / "dump")])
    assert_same_params(dumps(tmp_path / "dump", 1)[0], dumps(tmp_path / "ref", 1)[0])


def test_sigterm_saves_at_step_boundary_and_exits_75(tmp_path):
    ref = reference(tmp_path, "python")
    run = tmp_path / "run"
    proc = start(run, "python")
    wait_for(run / "checkpoints" / "step_5" / "COMMITTED", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err  # "stopped, checkpoint saved, resume me"
    assert not (run / "results.json").exists()
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
    # torchrun reports its workers' exit 75 as its own failure, the code in its summary.
    assert proc.returncode == 1 and "exitcode  : 75" in err, err
    assert "received" in out and "--resume auto" in out
    assert latest_step(run) < 30
    launch(TINY, [*ARGS, "--output-dir", str(run), "--resume", "auto",
                  "--dump", str(tmp_path / "dump")], launcher="torchrun")
    assert_same_params(dumps(tmp_path / "dump", 1)[0], ref)


def test_a_row_torn_by_a_crash_is_cut_at_resume(tmp_path):
    out = tmp_path / "run"
    args = ["--output-dir", str(out), "--max-steps", "6", "--log-every", "1",
            "--checkpoint-every", "3", "--no-progress"]
    launch(DIGITS, args)
    rows = (out / "metrics.jsonl").read_text().splitlines()
    (out / "results.json").unlink()
    # As a SIGKILL mid-write leaves it: the first rows, then half of the next one.
    (out / "metrics.jsonl").write_text("\n".join(rows[:3]) + "\n" + rows[3][:10])
    launch(DIGITS, [*args, "--resume", str(out / "checkpoints" / "step_3")])
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if "train_loss" in x] == [1, 2, 3, 4, 5, 6]
