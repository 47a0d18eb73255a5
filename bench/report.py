"""What every benchmark prints: the machine it ran on, and its markdown table."""

from __future__ import annotations

import os
import platform
import subprocess

import torch


def device_name(device: str = "cpu") -> str:
    """The GPU's name, or the CPU model (``lscpu``) and core count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(l.split(":", 1)[1].strip() for l in out.splitlines()
                     if l.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores"


def emit(lines: list[str], out: str | None) -> None:
    """Print the report and, with ``out``, append it to that markdown file."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        with open(out, "a") as f:
            f.write("\n" + text)
