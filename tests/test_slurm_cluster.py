"""The localhost Slurm cluster of tests/slurm_cluster.py does what the Slurm tests rely on:
batch jobs, two-node steps, requeue, signals to the batch script, exit codes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster

pytestmark = pytest.mark.slurm


def _until(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def test_batch_job_completes(slurm, tmp_path):
    print(f"cluster started in {slurm.started_in:.1f}s")
    job = slurm.sbatch(f"#!/bin/bash\necho hello $SLURM_JOB_ID > {tmp_path}/done\n",
                       "-o", str(tmp_path / "out"))
    assert slurm.wait(job) == ("COMPLETED", "0:0")
    assert (tmp_path / "done").read_text() == f"hello {job}\n"


def test_two_node_step(slurm, tmp_path):
    job = slurm.sbatch("#!/bin/bash\nsrun bash -c 'echo $SLURM_NODEID $SLURMD_NODENAME'\n",
                       "-N", "2", "--ntasks-per-node=1", "-o", str(tmp_path / "out"))
    assert slurm.wait(job) == ("COMPLETED", "0:0"), slurm.output(job)
    assert sorted((tmp_path / "out").read_text().split("\n")[:-1]) == ["0 n1", "1 n2"]


def test_jobs_share_a_node(slurm, tmp_path):
    # Each of two one-CPU jobs on n1 waits for the other's file: both must run at once.
    script = ("#!/bin/bash\ntouch {d}/{me}\n"
              "for i in $(seq 100); do [ -e {d}/{other} ] && exit 0; sleep 0.1; done\nexit 1\n")
    jobs = [slurm.sbatch(script.format(d=tmp_path, me=me, other=other), "-w", "n1", "-n", "1",
                         "-o", "/dev/null") for me, other in (("a", "b"), ("b", "a"))]
    assert [slurm.wait(j) for j in jobs] == [("COMPLETED", "0:0")] * 2


def test_requeue_runs_again(slurm, tmp_path):
    # The first run requeues itself and exits; the second (SLURM_RESTART_COUNT=1) completes.
    # The job waits AuthInfo's cred_expire (5 s) before it starts again.
    script = """#!/bin/bash
echo "run ${SLURM_RESTART_COUNT:-0}"
if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then scontrol requeue $SLURM_JOB_ID; exit 0; fi
"""
    t0 = time.monotonic()
    job = slurm.sbatch(script, "--requeue", "--open-mode=append", "-o", str(tmp_path / "out"))
    assert slurm.wait(job, timeout=90) == ("COMPLETED", "0:0"), slurm.output(job)
    print(f"requeue round trip {time.monotonic() - t0:.1f}s")
    # slurmstepd may log that the requeue cancelled the first run: not the script's lines.
    lines = (tmp_path / "out").read_text().splitlines()
    assert [x for x in lines if not x.startswith("slurmstepd")] == ["run 0", "run 1"]
    assert slurm.job(job)["Restarts"] == "1"


def test_usr1_reaches_batch_script(slurm, tmp_path):
    # bash runs a trap only between commands, so the script waits on a background sleep.
    script = f"""#!/bin/bash
trap 'echo got USR1 > {tmp_path}/usr1; exit 0' USR1
touch {tmp_path}/ready
sleep 60 & wait
exit 1
"""
    job = slurm.sbatch(script, "-o", str(tmp_path / "out"))
    _until(tmp_path / "ready")
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    assert slurm.wait(job) == ("COMPLETED", "0:0"), slurm.output(job)
    assert (tmp_path / "usr1").read_text() == "got USR1\n"


def test_failing_job(slurm, tmp_path):
    job = slurm.sbatch("#!/bin/bash\nexit 3\n", "-o", str(tmp_path / "out"))
    assert slurm.wait(job) == ("FAILED", "3:0")


def test_stop_leaves_nothing_running(slurm, tmp_path):
    # A second cluster beside the session's, stopped while a job runs: stop() must kill the
    # job too. (Taking `slurm` makes sure Slurm is installed, or skips.)
    with SlurmCluster() as cluster:
        job = cluster.sbatch(f"#!/bin/bash\ntouch {tmp_path}/ready\nsleep 300\n", "-o", "/dev/null")
        _until(tmp_path / "ready")
        root = cluster.root
        assert cluster._leftovers()  # sees the daemons and the job
    assert not cluster._leftovers() and not root.exists(), job
