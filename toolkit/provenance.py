"""What made a run, beside its results (as airbench saves its own source with each run).

``provenance.json`` in the run folder is a list with one record per start of the run (the
first start, then each resume): the command line, the toolkit's version, the git commit of
the code and whether it had uncommitted changes (their diff goes to ``code-<start>.diff``
next to it), the device, the world size and the versions of Python, torch, accelerate and
deepspeed. The resolved config is ``config.json``.
"""

from __future__ import annotations

import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

from toolkit.atomic import write_atomic
from toolkit.run_folder import RunFolder

CODE = Path(__file__).resolve().parents[1]
"""The folder holding the toolkit package: a git work tree when run from a clone."""


def _git(*args: str) -> str | None:
    try:
        p = subprocess.run(["git", "-C", str(CODE), *args], capture_output=True, text=True,
                           timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout if p.returncode == 0 else None


def git_state() -> tuple[str | None, str | None, list[str]]:
    """The commit of the toolkit's work tree, the diff of its uncommitted changes to tracked
    files (None when clean) and its untracked files (None, None, [] outside a git tree)."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return None, None, []
    diff = _git("diff", "HEAD", "--no-color")
    untracked = (_git("ls-files", "--others", "--exclude-standard") or "").splitlines()
    return commit.strip(), diff or None, untracked


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({cpu_name()}, {torch.get_num_threads()} threads)"


def record(out: Path, device: torch.device, world_size: int, strategy: str) -> dict:
    """Append this start's record to ``out/provenance.json`` (main process only); return it."""
    folder = RunFolder(out)
    commit, diff, untracked = git_state()
    before = folder.read_provenance()
    start = len(before)
    entry = {
        "start": start, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [sys.executable, *sys.argv], "host": socket.gethostname(),
        "toolkit": _version("toolkit"), "git_commit": commit, "git_dirty": diff is not None,
        "untracked": untracked,
        "device": device_name(device), "world_size": world_size, "strategy": strategy,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "accelerate": _version("accelerate"), "deepspeed": _version("deepspeed"),
                     "cuda": torch.version.cuda},
    }
    if diff is not None:
        path = folder.code_diff(start)
        entry["diff"] = path.name  # beside provenance.json, wherever the folder moves
        write_atomic(path, diff)
    folder.write_provenance([*before, entry])
    return entry
