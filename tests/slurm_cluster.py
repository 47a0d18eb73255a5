"""A real Slurm cluster on localhost for the tests: munged, slurmctld and two slurmd (n1, n2),
everything (config, key, state, spool, logs, sockets) under one temp dir, on free ports of
127.0.0.1. Tests use the session fixture ``slurm``:

    # the fixture `slurm` (tests/conftest.py imports it)

    def test_x(slurm, tmp_path):
        job = slurm.sbatch("#!/bin/bash\\necho hi", "-o", str(tmp_path / "out"))
        assert slurm.wait(job) == ("COMPLETED", "0:0")
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from toolkit.experiments.sweep import free_port

DAEMONS = ("sbatch", "slurmctld", "slurmd", "munged")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
# Terminal states of a job: `wait` returns on these. REQUEUED/PENDING/COMPLETING are not.
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
         "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
MARKER = "TEST_SLURM_CLUSTER"  # set in every daemon's and job's environment, to find leftovers


class SlurmUnavailable(RuntimeError):
    pass


def _which(name: str) -> str | None:
    # The daemons live in /usr/sbin, which a non-login PATH may lack.
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which(name, path=path)


def ensure_installed() -> None:
    """Install Debian's Slurm and MUNGE if missing; raise SlurmUnavailable if that can't be."""
    if all(map(_which, DAEMONS)):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and apt-get as root is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y",
               "--no-install-recommends", *PACKAGES]
    # Without a policy-rc.d the postinst scripts would start system-wide munged/slurmd/slurmctld
    # through init.d; 101 tells invoke-rc.d not to. Only add one for the install if none exists.
    policy = Path("/usr/sbin/policy-rc.d")
    added = not policy.exists()
    if added:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
        # No package lists (a fresh image) or stale ones (404s): update them, then retry.
        if proc.returncode != 0 and re.search(
                r"Unable to locate|no installation candidate|Failed to fetch",
                proc.stdout + proc.stderr):
            subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "update"], env=env,
                           capture_output=True)
            proc = subprocess.run(install, env=env, capture_output=True, text=True)
    finally:
        if added:
            policy.unlink()
    if not all(map(_which, DAEMONS)):
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {lines[-1]}")


def _die_with_parent() -> None:
    # If the test session is killed outright, the daemons go with it instead of lingering.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _parse(line: str) -> dict[str, str]:
    """`Key=value Key=value` as printed by `scontrol -o` and jobcomp/filetxt (values may hold
    spaces, so a value runs up to the next ` Key=`)."""
    return dict(re.findall(r"([\w:/]+)=(.*?)(?= [\w:/]+=|$)", line.strip()))


class SlurmCluster:
    """Start with ``with SlurmCluster() as c:`` (or ``c.start()`` / ``c.stop()``)."""

    def __init__(self, nodes: tuple[str, ...] = ("n1", "n2"), cpus: int = 2):
        self.nodes, self.cpus = nodes, cpus
        self.root = Path(tempfile.mkdtemp(prefix="slurm-"))  # mode 0700, as munged wants
        self.conf = self.root / "slurm.conf"
        self.socket = self.root / "munge" / "munge.socket"
        self.jobcomp = self.root / "jobcomp.txt"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), MARKER: str(self.root)}
        for key in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
            if key != "SLURM_CONF":  # a cluster around the test session must not leak in
                del self.env[key]
        self._procs: dict[str, subprocess.Popen] = {}
        self.started_in: float | None = None

    # -- start / stop ---------------------------------------------------------------------

    def config(self) -> str:
        r = self.root
        nodes = "\n".join(
            f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname=localhost Port={free_port()} "
            f"CPUs={self.cpus} State=UNKNOWN" for n in self.nodes)
        return f"""\
ClusterName=test
# "localhost" is accepted as this controller whatever the machine's hostname is.
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
# Bind to 127.0.0.1 (the nodes' and controller's address), not to every interface.
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Our own munged; cred_expire is also how long a requeued job waits (default 120 s).
AuthInfo=socket={self.socket},cred_expire=5
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: track job processes by parentage, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
# Several jobs/tasks share a node by cores; both nodes claim the same {self.cpus} cores.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
# Fast turnaround: schedule every second, return nodes by themselves, purge late.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
ReturnToService=2
MinJobAge=300
KillWait=2
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp}
{nodes}
PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
"""

    def start(self, timeout: float = 60) -> SlurmCluster:
        t0 = time.monotonic()
        for d in ("state", "run", "log", "munge", *(f"spool/{n}" for n in self.nodes)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        self.conf.write_text(self.config())
        try:
            # NoInAddrAny makes srun listen on, and advertise, what the hostname resolves to.
            host = socket.gethostname()
            if not socket.gethostbyname(host).startswith("127."):
                raise SlurmUnavailable(f"hostname {host} does not resolve to loopback")
            m = self.root / "munge"
            # In the foreground munged logs to its console (log/munged.stdout), not a file.
            # --force: it refuses a socket dir that only root may enter (our 0700 temp dir).
            self._spawn("munged", [_which("munged"), "--foreground", "--force",
                                   f"--socket={self.socket}", f"--key-file={key}",
                                   f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed"])
            self._until(self.socket.exists, timeout, "munged socket")
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
            for n in self.nodes:
                self._spawn(f"slurmd-{n}", [_which("slurmd"), "-D", "-N", n, "-f", str(self.conf)])
            self._until(self._nodes_idle, timeout, "all nodes idle")
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - t0
        return self

    def _spawn(self, name: str, cmd: list) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "wb")
        self._procs[name] = subprocess.Popen(
            cmd, env=self.env, cwd=self.root, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
        out.close()

    def _until(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self._procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"timed out after {timeout:.0f}s"
                raise RuntimeError(f"Slurm test cluster: waiting for {what}: {why}\n{self.logs()}")
            time.sleep(0.2)

    def _nodes_idle(self) -> bool:
        p = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        states = dict(line.split() for line in p.stdout.splitlines() if line.strip())
        return p.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes)

    def logs(self, tail: int = 30) -> str:
        """The daemons' logs (slurmd's also holds its slurmstepd's), and the console of munged
        and of any daemon that died (a bad config is only reported there)."""
        files = sorted((self.root / "log").glob("*.log"))
        files += [self.root / "log" / f"{n}.stdout" for n, p in self._procs.items()
                  if n == "munged" or p.poll() is not None]
        parts = []
        for f in files:
            lines = f.read_text(errors="replace").splitlines()[-tail:] if f.exists() else []
            if lines:
                parts.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop the daemons by their pid files (TERM, then KILL), kill the jobs' processes
        (slurmstepd and below), and fail if any process of this cluster survives. No scancel:
        it would wait on a slurmctld that is hung or gone."""
        ours = self._leftovers()  # now, while job processes still hang below their slurmstepd
        daemons = {p.pid for p in self._procs.values()}
        for f in [*(self.root / "run").glob("*.pid"), self.root / "munge" / "munged.pid"]:
            try:
                pid = int(f.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            if pid in ours:  # not a stale file naming someone else's process
                daemons.add(pid)
        # All at once: a slurmd told to stop while slurmctld is gone waits ~10 s on it.
        self._terminate(daemons, grace=10)
        self._terminate(ours | self._leftovers(), grace=0)
        for p in self._procs.values():
            p.wait()
        self._procs.clear()
        if left := self._leftovers():
            raise RuntimeError(f"Slurm test cluster left processes: {sorted(left)}")
        shutil.rmtree(self.root, ignore_errors=True)

    def _terminate(self, pids: set[int], grace: float) -> None:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + wait
            while ((pids := {p for p in pids if _stat(p) is not None})
                   and time.monotonic() < deadline):
                for p in self._procs.values():
                    p.poll()  # reap our own children, or they stay zombies and look alive
                time.sleep(0.05)
            if not pids:
                return

    def _leftovers(self) -> set[int]:
        """Live processes of this cluster: those with the marker in their environment (daemons,
        slurmstepd, jobs that kept our environment) or our temp dir in their cmdline or cwd,
        and all their descendants."""
        parent, found, tag = {}, set(), f"{MARKER}={self.root}".encode()
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            if (ppid := _stat(int(d.name))) is None:
                continue
            parent[int(d.name)] = ppid
            try:
                env = (d / "environ").read_bytes().split(b"\0")
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ")
                cwd = os.readlink(d / "cwd")
            except OSError:
                continue
            if tag in env or str(self.root).encode() in cmd or cwd.startswith(str(self.root)):
                found.add(int(d.name))
        while more := {p for p, pp in parent.items() if pp in found and p not in found}:
            found |= more
        return found

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- using it -------------------------------------------------------------------------

    def run(self, *cmd, check: bool = True, timeout: float = 30,
            **kw) -> subprocess.CompletedProcess:
        """Run a client command (sbatch, squeue, scontrol, sacct, scancel...) against this
        cluster: ``run("squeue -h")``, ``run("squeue", "-h")`` or ``run(["squeue", "-h"])``."""
        if len(cmd) == 1:
            cmd = shlex.split(cmd[0]) if isinstance(cmd[0], str) else cmd[0]
        env = {**self.env, **kw.pop("env", {})}
        p = subprocess.run([str(c) for c in cmd], env=env, cwd=kw.pop("cwd", self.root),
                           capture_output=True, text=True, timeout=timeout, **kw)
        if check and p.returncode != 0:
            raise RuntimeError(f"{shlex.join(map(str, cmd))}: exit {p.returncode}\n"
                               f"{p.stdout}{p.stderr}")
        return p

    def sbatch(self, script: str | os.PathLike, *args: str, env: dict | None = None,
               cwd: str | os.PathLike | None = None) -> str:
        """Submit a script (a path, or its text) and return the job id. ``env`` is added to
        the submitting environment, which the job inherits."""
        if isinstance(script, str) and ("\n" in script or script.startswith("#!")):
            fd, path = tempfile.mkstemp(suffix=".sh", dir=self.root)
            os.write(fd, script.encode())
            os.close(fd)
            script = path
        p = self.run("sbatch", "--parsable", *args, str(script), env=env or {},
                     cwd=cwd or self.root)
        return p.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str] | None:
        """The job's record: from `scontrol show job` while the controller has it, else its
        last line in the jobcomp file; None if neither knows it."""
        p = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        if p.returncode == 0 and p.stdout.strip():
            return _parse(p.stdout.splitlines()[0])
        if self.jobcomp.exists():
            for line in reversed(self.jobcomp.read_text().splitlines()):
                if (rec := _parse(line)).get("JobId") == job_id:
                    return rec
        return None

    def job_state(self, job_id: str) -> tuple[str, str] | None:
        """(state, exit code) such as ("COMPLETED", "0:0"), or None if the job is unknown."""
        rec = self.job(job_id)
        return (rec["JobState"], rec.get("ExitCode", "")) if rec else None

    def output(self, job_id: str) -> str:
        rec = self.job(job_id) or {}
        path = Path(rec.get("StdOut", "")) if rec.get("StdOut") else None
        return path.read_text(errors="replace") if path and path.is_file() else ""

    def wait(self, job_id: str, timeout: float = 60) -> tuple[str, str]:
        """Wait for the job to end; return (state, exit code) like ("FAILED", "3:0")."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state and state[0] in FINAL:
                return state
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} not done after {timeout:.0f}s: {self.job(job_id)}\n"
                           f"--- output\n{self.output(job_id)}\n{self.logs()}")


def _stat(pid: int) -> int | None:
    """The parent pid of a live process; None if it is gone or a zombie (already dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
    except (OSError, ValueError):
        return None
    return None if state in "ZX" else int(ppid)


@pytest.fixture(scope="session")
def slurm():
    """A started two-node cluster for the whole session; skips if Slurm can't be installed."""
    try:
        ensure_installed()
        cluster = SlurmCluster().start()
    except SlurmUnavailable as e:
        pytest.skip(str(e))
    try:
        yield cluster
    finally:
        cluster.stop()
