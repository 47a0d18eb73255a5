"""ZeRO and FSDP2 on 2 CPU processes: step time and what each rank holds, for every strategy
vs DDP.

For each strategy (ddp, zero1, zero2, zero3, zero2-offload, zero3-offload, fsdp2; and
fsdp2-offload on a GPU) and each
optimizer (AdamW, AMSGrad) this script launches itself under ``torchrun --nproc_per_node 2``
as a worker. The worker trains an 8.67M-parameter residual MLP stack (4 pre-LayerNorm blocks
of width 512, hidden 2048: large enough that the all-reduce and the optimizer step matter
next to forward and backward) through :class:`toolkit.trainer.Trainer`, times
``trainer.optimizer_step`` (forward, backward, gradient reduction, step, 1cycle) after a
warm-up, and reports per rank: the median step time, the bytes of each optimizer state
(:func:`toolkit.parallel.optimizer_state_bytes`), the model parameters it holds, the fp32
master copy DeepSpeed keeps beside them, and its peak RSS. The parent prints one table with
ratios to DDP from the same run and checks that ZeRO and FSDP2 halve the optimizer states: each
rank's bytes of each state within 5% of the unsharded size / 2.

Measured 2026-11-26 on 2 shared AMD EPYC cores (docs/benchmarks.md, "ZeRO on 2 CPU
processes"): every ZeRO stage holds exactly half of each state (AMSGrad's max_exp_avg_sq
too) and trains to DDP's loss, at 1.7-3.2x DDP's step time; at this size DeepSpeed's
buffers and fp32 master copy add more memory per rank than the sharding saves.

    python bench/zero.py                          # ~8 min on 2 shared cores (14 launches)
    python bench/zero.py --steps 30 --out docs/benchmarks.md   # also append the output there

DeepSpeed's first CPU launch JIT-builds its shm comm op (~40 s, cached afterwards).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch
from torch import nn

from report import device_name, emit
from toolkit.parallel import CONCRETE

# Every strategy a run can have here (fsdp2-offload needs a GPU: refused on CPU in one line).
STRATEGIES = [s for s in CONCRETE if torch.cuda.is_available() or s != "fsdp2-offload"]

ROOT = Path(__file__).resolve().parents[1]
D_IN, WIDTH, HIDDEN, BLOCKS, CLASSES = 512, 512, 2048, 4, 10


class Block(nn.Module):
    """Pre-LayerNorm residual MLP: the feed-forward half of a transformer block."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up, self.down = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(D_IN, WIDTH), *(Block(WIDTH, HIDDEN) for _ in range(BLOCKS)),
                         nn.LayerNorm(WIDTH), nn.Linear(WIDTH, CLASSES))


def local(t: torch.Tensor) -> torch.Tensor:
    return getattr(t, "_local_tensor", t)  # a DTensor's own shard


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---- worker: one (strategy, optimizer) on this rank -----------------------------------------
def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from toolkit import parallel as strategy
    from toolkit.config import OptimConfig, ScheduleConfig, TrainConfig
    from toolkit.data.source import DeviceTensors
    from toolkit.trainer import Trainer

    rss_before = rss_bytes()
    torch.manual_seed(0)  # the same weights on every rank
    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    n = args.batch * (args.warmup + args.steps)
    data = DeviceTensors(torch.randn(n, D_IN, generator=g),
                         torch.randint(0, CLASSES, (n,), generator=g))
    train = TrainConfig(output_dir=args.output_dir, max_steps=args.warmup + args.steps,
                        batch_size=args.batch, strategy=args.strategy, progress=False)
    trainer = Trainer(model, data, None, train=train,
                      optim=OptimConfig(lr=1e-3, amsgrad=args.amsgrad), schedule=ScheduleConfig())
    trainer.model.train()
    it = trainer.train_data.batches(trainer.step)
    for _ in range(args.warmup):
        trainer.optimizer_step(it)
    times = []
    for _ in range(args.steps):
        dist.barrier()  # start every step together: the time is the step's, not a straggler's
        start = time.perf_counter()
        loss = trainer.optimizer_step(it).item()
        times.append(time.perf_counter() - start)

    # What this rank holds. Under ZeRO-3 a parameter's data is empty between uses and its
    # shard is `ds_tensor`. The torch optimizer inside DeepSpeed steps flat fp32 partitions
    # that DeepSpeed 0.19.8 on CPU allocates as copies of the parameters (shards), at every
    # stage, even when the model itself is fp32; under DDP it steps the parameters.
    # FSDP2's parameters are DTensors: this rank holds its `_local_tensor`.
    module = getattr(trainer.model, "module", trainer.model)
    params = [local(p) for p in module.parameters()]
    held = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size()
               for p in params)
    model_storages = {t.untyped_storage().data_ptr() for p in params
                      for t in (p, getattr(p, "ds_tensor", p)) if t.numel()}
    inner = strategy.torch_optimizer(trainer.optimizer)
    # The tensors the optimizer holds state for (ZeRO-3 empties param_groups between steps).
    master = sum(q.numel() * q.element_size() for q in map(local, inner.state)
                 if q.untyped_storage().data_ptr() not in model_storages)
    acc = trainer.accelerator
    result = {"rank": acc.process_index, "world": acc.num_processes,
              "distributed_type": acc.distributed_type.value, "optimizer": type(inner).__name__,
              "amsgrad": bool(inner.defaults.get("amsgrad")), "n_params": n_params,
              "median_s": statistics.median(times),
              "q25_s": statistics.quantiles(times, n=4)[0],
              "q75_s": statistics.quantiles(times, n=4)[2], "last_loss": loss,
              "state_bytes": strategy.optimizer_state_bytes(trainer.optimizer),
              "param_bytes": held, "master_bytes": master,
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "rss_before_bytes": rss_before}
    trainer.close()
    # A file per rank: the two ranks' stdout interleave mid-line under torchrun.
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    Path(args.output_dir, f"result.rank{result['rank']}.json").write_text(json.dumps(result))


# ---- parent: launch every case, print the table --------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(name: str, amsgrad: bool, args: argparse.Namespace, tmp: Path) -> list[dict] | str:
    """Both ranks' results, or the error that stopped the launch."""
    out = tmp / f"{name}-{'amsgrad' if amsgrad else 'adamw'}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__, "--worker",
           "--strategy", name, "--output-dir", str(out), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch", str(args.batch)]
    cmd += ["--amsgrad"] if amsgrad else []
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)  # the trainer sets what each strategy needs
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {args.timeout} s"
    results = [json.loads(f.read_text()) for f in sorted(out.glob("result.rank*.json"))]
    if proc.returncode == 0 and len(results) == 2:
        return results
    lines = (proc.stderr + proc.stdout).splitlines()
    print(f"# {name} {'AMSGrad' if amsgrad else 'AdamW'} failed; its last output lines:",
          *lines[-60:], sep="\n", file=sys.stderr)
    # The ranks' own exception, else C++'s terminate message and torchrun's summary of the
    # rank that died (a signal leaves no Python traceback).
    errors = [l.strip() for l in lines if re.match(r"[\w.:]+(Error|Exception|EnforceNotMet)\b.*: ",
                                                   l.strip()) and "ChildFailedError" not in l]
    errors += [l.strip() for l in lines if "what():" in l or "terminate called" in l]
    errors += ["; ".join(l.strip() for l in lines
                         if re.match(r"\s*(rank|exitcode|traceback)\s*:", l))]
    return f"exit {proc.returncode}: " + next(e for e in errors if e)[:300].replace("|", "/")


def mb(b: float) -> str:
    return f"{b / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=64, help="global batch (2 x micro-batch)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per launch")
    parser.add_argument("--out", help="also append the output to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--amsgrad", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    started = time.time()
    runs: dict[tuple[str, bool], list[dict] | str] = {}
    failed: dict[tuple[str, bool], str] = {}  # first launches that failed
    with tempfile.TemporaryDirectory() as tmp:
        for amsgrad in (False, True):
            for name in STRATEGIES:
                t = time.time()
                runs[name, amsgrad] = launch(name, amsgrad, args, Path(tmp))
                if isinstance(runs[name, amsgrad], str):
                    # Once more, to tell a flaky launch from a broken strategy; both reported.
                    failed[name, amsgrad] = runs[name, amsgrad]
                    runs[name, amsgrad] = launch(name, amsgrad, args, Path(tmp, "rerun"))
                print(f"# {name} {'AMSGrad' if amsgrad else 'AdamW'}: {time.time() - t:.0f} s",
                      file=sys.stderr, flush=True)
    n_params = next(r[0]["n_params"] for r in runs.values() if not isinstance(r, str))

    lines = [
        f"{datetime.date.today()}, {device_name()}, torch {torch.__version__}, DeepSpeed "
        f"{version('deepspeed')}, accelerate {version('accelerate')}; 2 processes x 1 "
        f"thread, gloo; {n_params / 1e6:.2f}M fp32 params ({BLOCKS} residual MLP blocks "
        f"{WIDTH}-{HIDDEN}-{WIDTH}), global batch {args.batch}; median (p25-p75) of "
        f"{args.steps} steps after {args.warmup}, rank 0; {time.time() - started:.0f} s in all.",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        "A step is `trainer.optimizer_step`: forward, backward, gradient reduction, optimizer "
        "step, 1cycle. Bytes are per rank (rank 0; rank 1 in the check below). \"fraction\" is "
        "this rank's optimizer-state bytes over the unsharded size, 4 bytes x params x states; "
        "\"peak RSS added\" is the process's peak RSS minus its RSS after the imports (max of "
        "ranks): model, data, buffers, gradients and all.",
        "",
        "| strategy | optimizer | ms/step (p25-p75) | ratio to DDP | optimizer state MB/rank "
        "| fraction of unsharded | params MB/rank | fp32 master copy MB/rank "
        "| peak RSS added MB/rank | loss at last step (mean of ranks) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    checks, notes = [], []
    for amsgrad in (False, True):
        label = "AMSGrad" if amsgrad else "AdamW"
        keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
        full = 4 * n_params  # one fp32 state, unsharded
        base = runs["ddp", amsgrad]
        for name in STRATEGIES:
            r = runs[name, amsgrad]
            if isinstance(r, str):
                lines.append(f"| {name} | {label} | failed twice: {r} | | | | | | | |")
                checks.append(f"{name} {label}: FAILED to run twice (first: "
                              f"{failed[name, amsgrad]}; second: {r})")
                continue
            r0 = r[0]
            if (name, amsgrad) in failed:
                notes.append(f"{name} {label}: the first launch failed ({failed[name, amsgrad]}); "
                             "the row is its rerun.")
            ratio = "" if isinstance(base, str) else f"{r0['median_s'] / base[0]['median_s']:.2f}"
            state = sum(r0["state_bytes"].values())
            lines.append(
                f"| {name} | {label} | {r0['median_s'] * 1e3:.0f} ({r0['q25_s'] * 1e3:.0f}-"
                f"{r0['q75_s'] * 1e3:.0f}) | {ratio} | {mb(state)} | "
                f"{state / (full * len(keys)):.3f} | {mb(r0['param_bytes'])} | "
                f"{mb(r0['master_bytes'])} | "
                f"{mb(max(x['peak_rss_bytes'] - x['rss_before_bytes'] for x in r))} | "
                f"{statistics.mean(x['last_loss'] for x in r):.5f} |")
            # The check: ZeRO and FSDP2 halve every state on every rank; DDP holds all of each.
            target = full if name == "ddp" else full / 2
            worst = max(abs(x["state_bytes"].get(k, 0) - target) / target for x in r for k in keys)
            ok = worst <= 0.05 and all(set(x["state_bytes"]) == set(keys) for x in r)
            per_rank = "; ".join(f"rank {x['rank']} " + ", ".join(
                f"{k} {x['state_bytes'].get(k, 0):,}" for k in keys) for x in r)
            checks.append(f"{name} {label}: {'PASS' if ok else 'FAIL'}, worst deviation "
                          f"{worst:.2%} from {'total/2' if target < full else 'total'} = "
                          f"{int(target):,} B per state ({per_rank})")
    lines += [""] + [f"- {n}" for n in notes] if notes else []
    lines += ["", "Check: each rank's bytes of each optimizer state within 5% of the "
                  "unsharded size / 2 for ZeRO and FSDP2 (equal to it for DDP):", ""]
    lines += [f"- {c}" for c in checks]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
