"""``bash bench/device_check.sh --dry-run``: every GPU check runs on CPU with tiny sizes and
lands in one table, so a lent GPU's 15 minutes go to measuring, not to set-up."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT

SHARED = ROOT.parent / "shared" / "data"


@pytest.mark.slow  # ~2 minutes on 2 cores
@pytest.mark.skipif(not (SHARED / "cifar-10-batches-bin").is_dir()
                    or not (SHARED / "wikitext-2").is_dir(),
                    reason=f"no CIFAR-10 or WikiText-2 under {SHARED}")
def test_dry_run_runs_every_step_into_one_table(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "SHARED": str(SHARED)}
    proc = subprocess.run(["bash", "bench/device_check.sh", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (tmp_path / "device_check.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    steps = [row.split(" | ")[0].lstrip("| ") for row in rows[:7]]
    assert steps == ["GPU tests", "QRNN kernel and cuDNN paths vs reference (CUDA)",
                     "optimizer step", "step inside ZeRO-2 and FSDP2",
                     "WikiText-2 paper-lstm, 1 epoch", "WikiText-2 paper-qrnn, 1 epoch",
                     "CIFAR-10 paper-18ep-tta, bf16 + channels-last + compile"]
    assert all(" | ok | " in row for row in rows[:7]), rows
    assert "valid_ppl" in rows[4] and "valid_ppl" in rows[5] and "s of training" in rows[5]
    assert "plain_accuracy" in rows[6] and "tta_accuracy" in rows[6]
    # The benchmarks' own tables follow: the roofline and the sharded step.
    assert "toolkit (auto)" in table and "ZeRO-2 engine.step ms" in table
    assert "| AMSGrad (toolkit fused) |" in table


def test_a_bad_option_is_one_line():
    proc = subprocess.run(["bash", "bench/device_check.sh", "--gpu"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout.strip().startswith("usage:")
