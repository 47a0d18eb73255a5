"""Optimizer step throughput against the memory-bandwidth bound of the same machine.

An Adam step is pure streaming: AdamW reads p, g, m, v and writes p, m, v, 28 bytes per
fp32 parameter (AMSGrad adds vmax: 36). So no kernel beats those bytes divided by the
bandwidth a plain elementwise op gets here, which this script measures in the same run
(``torch.add(a, b, out=c)`` over arrays far larger than the caches). It times the toolkit's
choice (``build_optimizer(impl="auto")``) against torch's for-loop, foreach and fused
kernels, DeepSpeedCPUAdam on CPU (AdamW only: it has no AMSGrad) and the compiled step on
CUDA, over ~25M parameters shaped like a small transformer + LSTM language model.

    python bench/optim_step.py                     # 25M params, CPU, ~2 min on 2 cores
    python bench/optim_step.py --device cuda --params 250e6
    python bench/optim_step.py --out docs/benchmarks.md   # also append the tables there
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from toolkit.optim import build_optimizer

LR, BETAS, EPS, WD = 1e-3, (0.95, 0.99), 1e-8, 0.01
BYTES_PER_PARAM = {"AdamW": 28, "AMSGrad": 36}  # fp32 p, g, m, v (+ vmax) read, p, m, v written


def model_shapes(n_params: int) -> list[tuple[int, ...]]:
    """Two transformer blocks, an LSTM layer and an embedding holding the rest of ``n_params``."""
    d = 768
    while 40 * d * d > n_params and d > 16:  # keep the fixed part below n_params
        d //= 2
    block = [(3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,),  # attention, its LayerNorm
             (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,)]  # MLP, its LayerNorm
    lstm = [(4 * d, d), (4 * d, d), (4 * d,), (4 * d,)]
    shapes = block + block + lstm
    rest = n_params - sum(math.prod(s) for s in shapes)
    return [(max(rest // d, 1), d)] + shapes


def timed(fn: Callable[[], object], sync: Callable[[], None], warmup: int, steps: int) -> float:
    """Median seconds of ``fn`` over ``steps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bandwidth(n: int, device: str, sync: Callable[[], None]) -> float:
    """Bytes/s of ``c = a + b`` over ``n`` fp32 elements: 2 arrays read, 1 written."""
    a, b, c = (torch.rand(n, device=device) for _ in range(3))
    seconds = timed(lambda: torch.add(a, b, out=c), sync, warmup=3, steps=20)
    return 12 * n / seconds


def optimizers(device: str, amsgrad: bool) -> dict[str, Callable[[list], object]]:
    """Name -> constructor over a list of parameters."""
    kw = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, amsgrad=amsgrad)
    makers = {
        "toolkit (auto)": lambda ps: build_optimizer(ps, "adamw", impl="auto", **kw),
        "torch for-loop": lambda ps: torch.optim.AdamW(ps, foreach=False, **kw),
        "torch foreach": lambda ps: torch.optim.AdamW(ps, foreach=True, **kw),
        "torch fused": lambda ps: torch.optim.AdamW(ps, fused=True, **kw),
    }
    if device == "cuda":
        makers["toolkit compiled"] = lambda ps: build_optimizer(ps, "adamw", impl="compiled",
                                                                **kw)
    elif not amsgrad:
        def deepspeed_cpu_adam(ps):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
                                    adamw_mode=True)
        makers["DeepSpeedCPUAdam"] = deepspeed_cpu_adam
    return makers


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(l.split(":", 1)[1].strip() for l in out.splitlines()
                     if l.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=25e6, help="parameters to update")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", help="also append the markdown to this file")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    torch.manual_seed(0)
    params = [torch.randn(s, device=args.device, requires_grad=True)
              for s in model_shapes(int(args.params))]
    for p in params:
        p.grad = torch.randn_like(p)
    n = sum(p.numel() for p in params)
    bw = bandwidth(max(n, 1 << 24), args.device, sync)

    lines = [
        f"{datetime.date.today()}, {device_name(args.device)}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {n / 1e6:.1f}M fp32 params in {len(params)} "
        f"tensors; `torch.add` bandwidth {bw / 1e9:.1f} GB/s; median of {args.steps} steps "
        f"after {args.warmup}.",
        f"Command: `python {' '.join(sys.argv)}`",
    ]
    for label, amsgrad in (("AdamW", False), ("AMSGrad", True)):
        results = {}
        for name, make in optimizers(args.device, amsgrad).items():
            try:
                opt = make(params)
            except Exception as e:  # noqa: BLE001 - a DeepSpeed op that fails to build
                results[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
                continue
            if hasattr(opt, "impl"):
                name = f"{name}: {opt.impl}"
            results[name] = timed(opt.step, sync, args.warmup, args.steps)
            del opt  # frees m, v before the next one allocates its own
        fastest = min(t for t in results.values() if isinstance(t, float))
        bound = BYTES_PER_PARAM[label] * n / bw
        lines += ["", f"{label} ({BYTES_PER_PARAM[label]} bytes/param, bound "
                      f"{bound * 1e3:.1f} ms/step):", "",
                  "| impl | ms/step | Mparams/s | ratio to fastest | fraction of bandwidth bound |",
                  "|---|---:|---:|---:|---:|"]
        for name, t in results.items():
            if isinstance(t, str):
                lines.append(f"| {name} | {t} | | | |")
            else:
                lines.append(f"| {name} | {t * 1e3:.1f} | {n / t / 1e6:.0f} | "
                             f"{t / fastest:.2f} | {bound / t:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
