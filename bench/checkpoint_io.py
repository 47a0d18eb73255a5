"""What a checkpoint's checksums cost, per GB written and per GB read back.

Every file of a checkpoint gets its size and CRC-32 recorded in the ``COMMITTED`` marker
(:func:`toolkit.checkpoint.checksums`) and verified before a resume (:func:`check`). Saving
hashes each file once after it is written (from the page cache); resuming reads each file
once more before ``torch.load`` reads it. This script times, on a state of ``--gb`` GB in
interleaved rounds: ``torch.save`` + fsync against the CRC-32 added to it (and sha256, the
strongest common alternative), and ``torch.load`` from a cold cache against the verify-then-
load the toolkit does (cold cache: ``/proc/sys/vm/drop_caches``, root only; otherwise warm,
and the table says so).

    python bench/checkpoint_io.py                       # 1 GB, ~1 minute on 2 cores
    python bench/checkpoint_io.py --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from report import device_name, emit
from toolkit.checkpoint import crc32


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sha256(file: Path) -> str:
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save(state: dict, file: Path) -> None:
    torch.save(state, file)
    with open(file, "rb+") as f:
        os.fsync(f.fileno())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="state size in GB (default 1)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="folder to write in (default: a temp dir "
                        "on the disk of the current folder)")
    parser.add_argument("--out", help="append the table to this markdown file")
    ns = parser.parse_args()
    n = int(ns.gb * 1e9 / 4)
    # Several tensors, like a model's state dict plus its optimizer's moments.
    state = {f"t{i}": torch.randn(n // 8) for i in range(8)}
    gb = sum(t.numel() * 4 for t in state.values()) / 1e9
    rows = {k: [] for k in ("save", "crc32 after save", "sha256 after save", "load",
                            "crc32 before load", "load after crc32")}
    cold = True
    with tempfile.TemporaryDirectory(dir=ns.dir or ".") as tmp:
        file = Path(tmp) / "state.pt"
        for _ in range(ns.rounds):
            rows["save"].append(timed(lambda: save(state, file)))
            rows["crc32 after save"].append(timed(lambda: crc32(file)))
            rows["sha256 after save"].append(timed(lambda: sha256(file)))
            cold &= drop_caches()
            rows["load"].append(timed(lambda: torch.load(file, weights_only=True)))
            cold &= drop_caches()
            rows["crc32 before load"].append(timed(lambda: crc32(file)))
            rows["load after crc32"].append(timed(lambda: torch.load(file, weights_only=True)))
    med = {k: statistics.median(v) for k, v in rows.items()}
    base = {"save": med["save"], "load": med["load"]}
    lines = [f"### {datetime.date.today()}, {device_name()}, torch {torch.__version__}, "
             f"{gb:.2f} GB state, median of {ns.rounds} rounds, "
             f"{'cold' if cold else 'warm (no drop_caches)'} cache before each load",
             "", f"`python bench/checkpoint_io.py --gb {ns.gb}`", "",
             "| step | s | s per GB | vs. the plain save / load |", "|---|---|---|---|"]
    for k, v in med.items():
        ref = base["save"] if "save" in k else base["load"]
        lines.append(f"| {k} | {v:.3f} | {v / gb:.3f} | {v / ref:.2f}x |")
    saved = med["crc32 after save"] / med["save"]
    resumed = (med["crc32 before load"] + med["load after crc32"]) / med["load"]
    lines += ["", f"Saving with CRC-32 takes {1 + saved:.2f}x the plain save; resuming with "
              f"verification takes {resumed:.2f}x the plain load (sha256 instead of CRC-32: "
              f"{1 + med['sha256 after save'] / med['save']:.2f}x on save)."]
    emit(lines, ns.out)


if __name__ == "__main__":
    main()
