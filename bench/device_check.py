"""Every GPU check in one call, one markdown table: ``bash bench/device_check.sh`` runs this
on a lent device; ``--dry-run`` runs every step on CPU with tiny sizes (a test does).

Steps, each in its own process with its own time limit inside ``--budget`` (500 s: a device
call may run 600; a failure is a row, never the end): the GPU tests and the QRNN kernel
against its reference on CUDA; the optimizer-step roofline (``bench/optim_step.py``) and the
step inside ZeRO-2 and FSDP2 (``bench/sharded_step.py``); one epoch of ``paper-lstm`` and of
``paper-qrnn`` (no cache pointer); CIFAR-10 ``paper-18ep-tta`` in bf16 + channels-last +
``--compile`` with the time left (cut short, its last evaluation and seconds still count).
Writes ``OUT/device_check.md``: the table (step, status, seconds, figures) and the
benchmarks' own tables under it.

    python bench/device_check.py --cifar DIR --wikitext DIR --out OUT [--dry-run]
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

from report import device_name

PY = sys.executable


def steps(cifar: str, wikitext: str, out: Path, dry: bool
          ) -> list[tuple[str, str, list[str], int]]:
    """(key, name, command, seconds allowed) of each check: the GPU's sizes, or tiny ones."""
    test = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    cifar_size = (["--max-steps", "2", "--model", "resnet9", "--width", "4", "--batch-size",
                   "64"] if dry else [])
    lm_size = (["--max-steps", "2", "--emb-size", "16", "--hidden-size", "16", "--bptt", "8",
                "--eval-batch-size", "64"] if dry else ["--epochs", "1"])

    def lm(preset: str) -> list[str]:
        return [PY, "recipes/wt2.py", "--preset", preset, "--no-cache", "--data-dir", wikitext,
                "--output-dir", str(out / preset), "--no-progress", *lm_size]

    return [  # the cheap correctness checks first, CIFAR-10 last with what time is left
        ("gpu-tests", "GPU tests", [*test, "-m", "gpu", "tests/test_gpu.py"], 120),
        ("qrnn-kernel", "QRNN kernel and cuDNN paths vs reference (CUDA)",
         [*test, "-m", "gpu", "tests/test_models.py"], 60),
        ("optim-step", "optimizer step",
         [PY, "bench/optim_step.py", "--device", "cpu" if dry else "cuda", "--params",
          "2e5" if dry else "2.5e8", "--steps", "2" if dry else "10", "--warmup",
          "1" if dry else "3", "--out", str(out / "optim.md")], 60),
        ("sharded-step", "step inside ZeRO-2 and FSDP2",
         [PY, "bench/sharded_step.py", "--params", "2e5" if dry else "2.5e8", "--width",
          "64" if dry else "8192"], 60),
        ("lstm", "WikiText-2 paper-lstm, 1 epoch", lm("paper-lstm"), 90),
        ("qrnn", "WikiText-2 paper-qrnn, 1 epoch", lm("paper-qrnn"), 75),
        ("cifar", "CIFAR-10 paper-18ep-tta, bf16 + channels-last + compile",
         [PY, "recipes/cifar10.py", "--preset", "paper-18ep-tta", "--precision", "bf16",
          "--channels-last", "--compile", "--data-dir", cifar, "--output-dir", str(out / "cifar"),
          "--no-progress", *cifar_size], 300),
    ]


def last_line(output: str) -> str:
    """The summary a step printed last (a table's row: the table follows the step table)."""
    lines = [line for line in output.splitlines() if line.strip()]
    if not lines:
        return ""
    return ("(its table is below)" if lines[-1].startswith("|")
            else lines[-1][:160].replace("|", "/"))


def figures(run: Path | None, output: str) -> str:
    """What a step measured: a run's final metrics (or, cut short, its last evaluation) and
    its training seconds, else the step's last line."""
    rows = []
    if run is not None and (run / "metrics.jsonl").is_file():
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "train_seconds" in row]
    if not evals:
        return last_line(output)
    final = json.loads((run / "results.json").read_text()) if (run / "results.json").is_file() \
        else {k: v for k, v in evals[-1].items() if k.startswith("valid_")}
    keys = ("plain_accuracy", "tta_accuracy", "valid_accuracy", "valid_ppl", "test_ppl")
    shown = [f"{k} {final[k]:.4g}" for k in keys if k in final][:3]
    return (", ".join(shown) + f"; {evals[-1]['train_seconds']:.1f} s of training to step "
            f"{evals[-1]['step']}" + ("" if (run / "results.json").is_file() else " (cut short)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cifar", required=True, help="CIFAR-10 binary folder")
    parser.add_argument("--wikitext", required=True, help="WikiText-2 folder")
    parser.add_argument("--out", required=True, help="folder for device_check.md and runs")
    parser.add_argument("--dry-run", action="store_true", help="every step, tiny, on CPU")
    parser.add_argument("--budget", type=float, default=500,
                        help="seconds for all steps (a device call may run 600)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    table = [f"Device check, {datetime.date.today()}: "
             f"{device_name('cpu' if args.dry_run else 'cuda')}, torch {torch.__version__}"
             f"{' (dry run: tiny sizes on CPU)' if args.dry_run else ''}", "",
             f"Command: `python {' '.join(sys.argv)}`", "",
             "| step | status | seconds | figures |", "|---|---|---:|---|"]
    failed, deadline = 0, time.perf_counter() + args.budget
    for key, name, command, limit in steps(args.cifar, args.wikitext, out, args.dry_run):
        limit = min(limit, deadline - time.perf_counter())
        if limit < 20:
            failed += 1
            table.append(f"| {name} | skipped: --budget {args.budget} s spent | | |")
            continue
        print(f"== {name}: {' '.join(command)}", flush=True)
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=limit)
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
            # stdout last: its final line is the step's summary, not a library's warning.
            output = proc.stderr + proc.stdout
        except subprocess.TimeoutExpired as e:
            # Captured output comes back as bytes here whatever text= said.
            output = (e.stderr or b"").decode(errors="replace") + \
                (e.stdout or b"").decode(errors="replace")
            status = f"timed out ({limit:.0f} s)"
        seconds = time.perf_counter() - start
        (out / f"{key}.log").write_text(output)
        print(output[-2000:], flush=True)
        failed += status != "ok"
        run = Path(command[command.index("--output-dir") + 1]) if "--output-dir" in command \
            else None
        table.append(f"| {name} | {status} | {seconds:.0f} | {figures(run, output)} |")
    if (out / "optim.md").is_file():
        table += ["", (out / "optim.md").read_text().strip()]
    if (out / "sharded-step.log").is_file():
        lines = (out / "sharded-step.log").read_text().splitlines()
        table += ["", "Step inside ZeRO-2 and FSDP2:", "",
                  *[line for line in lines if line.startswith(("|", "CPU,", "NVIDIA"))]]
    if (Path(args.cifar) / "data_batch_2.bin").is_symlink():
        table += ["", "CIFAR-10 here: data_batch_2..5 are data_batch_1 again (what a device call "
                  "carries), so each epoch has the paper's 50,000 images but 10,000 distinct "
                  "ones: its seconds per epoch are the paper's, its accuracy is not."]
    (out / "device_check.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
