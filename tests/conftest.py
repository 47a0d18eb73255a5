"""Launch recipes as real programs: one process, ``torchrun``, ``accelerate launch`` or
``deepspeed``."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from slurm_cluster import slurm  # noqa: F401  (the session's Slurm cluster, a fixture)
from toolkit.experiments.sweep import free_port, launch_prefix  # noqa: F401  (tests import it)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "tiny.py"
DIGITS = ROOT / "recipes" / "digits.py"
CPU_2PROC = ROOT / "launch" / "cpu-2proc.yaml"


def command(script: Path, args: list[str], launcher: str = "python", nproc: int = 2,
            config: Path = CPU_2PROC) -> list[str]:
    """The command line a user would type, with this interpreter and a free port (the one
    ``toolkit sweep`` runs its cells with)."""
    return [*launch_prefix(launcher, nproc, str(config)), str(script), *args]


def env(**extra: str) -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    e = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1",
         "TOKENIZERS_PARALLELISM": "false", **extra}
    e.pop("ACCELERATE_USE_CPU", None)
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):  # not launched by the tests' own launcher
        e.pop(key, None)
    return {**e, **extra}


def launch(script: Path, args: list[str], launcher: str = "python", nproc: int = 2,
           timeout: float = 300, check: bool = True, config: Path = CPU_2PROC,
           **env_extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(script, args, launcher, nproc, config), cwd=ROOT,
                          env=env(**env_extra),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def dumps(prefix: Path, world: int) -> list[dict]:
    return [torch.load(f"{prefix}.rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"
