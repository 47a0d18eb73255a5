"""Optimizer step throughput against the memory-bandwidth bound of the same machine.

An Adam step is pure streaming: AdamW reads p, g, m, v and writes p, m, v, 28 bytes per
fp32 parameter (AMSGrad adds vmax: 36). So no kernel beats those bytes divided by the
bandwidth a plain elementwise op gets here, which this script measures in the same run
(``a.add_(b)`` over arrays far larger than the caches). It times the toolkit's
choice (``build_optimizer(impl="auto")``) against torch's for-loop, foreach and fused
kernels, DeepSpeedCPUAdam and the toolkit's own wrapper of its op (``impl="deepspeed"``) on CPU
(AdamW only: it has no AMSGrad) and the compiled step on CUDA, over ~25M parameters shaped like a small transformer + LSTM language model.

    python bench/optim_step.py                     # 25M params, CPU: ~30 s on 2 cores
    python bench/optim_step.py --device cuda --params 250e6
    python bench/optim_step.py --out docs/benchmarks.md   # also append the tables there

The first CPU run also JIT-builds DeepSpeed's op (~40 s; a failed build becomes a table
row). Every optimizer of a table lives at once (they are timed in interleaved rounds):
memory is about (4 + 5 impls x 2 or 3 states) x 4 bytes per parameter.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

from report import device_name, emit
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


def interleaved(fns: dict[str, Callable[[], object]], sync: Callable[[], None], warmup: int,
                steps: int) -> dict[str, float]:
    """Median seconds per call of each fn, calling them in turn every round: a machine
    shared with other work then slows them all alike instead of whichever ran at the time.
    The order rotates each round, so that none always runs after the same neighbour."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    names = list(fns)
    times = {name: [] for name in names}
    for r in range(steps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


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
        if not amsgrad:  # DeepSpeed's FusedAdam has no AMSGrad
            def deepspeed_fused_adam(ps):
                from deepspeed.ops.adam import FusedAdam

                return FusedAdam(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
                                 adam_w_mode=True)
            makers["DeepSpeed FusedAdam"] = deepspeed_fused_adam
    elif not amsgrad:
        def deepspeed_cpu_adam(ps):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
                                    adamw_mode=True)
        makers["DeepSpeedCPUAdam"] = deepspeed_cpu_adam
        makers["toolkit deepspeed"] = lambda ps: build_optimizer(ps, "adamw", impl="deepspeed",
                                                                 **kw)
    return makers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=25e6, help="parameters to update")
    parser.add_argument("--steps", type=int, default=20, help="timed rounds (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
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
    # The bandwidth probe, a += b: 2 arrays read, 1 written, each far larger than the caches.
    # In place like the optimizers: writing a third array would also read each of its lines
    # first (write-allocate), and counting 12 bytes would understate the bandwidth by ~25%.
    a, b = (torch.rand(max(n, 1 << 24), device=args.device) for _ in range(2))
    probe_bytes = 12 * a.numel()

    lines = [
        f"{datetime.date.today()}, {device_name(args.device)}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {n / 1e6:.1f}M fp32 params in {len(params)} "
        f"tensors; median of {args.steps} rounds after {args.warmup}, each round one step "
        "of every impl and one bandwidth probe.",
        f"Command: `python {' '.join(sys.argv)}`",
    ]
    for label, amsgrad in (("AdamW", False), ("AMSGrad", True)):
        fns, failed = {"probe": lambda: a.add_(b)}, {}
        for name, make in optimizers(args.device, amsgrad).items():
            try:
                opt = make(params)
            except Exception as e:  # noqa: BLE001 - a DeepSpeed op that fails to build
                failed[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
                continue
            fns[f"{name}: {opt.impl}" if hasattr(opt, "impl") else name] = opt.step
        results = interleaved(fns, sync, args.warmup, args.steps)
        del fns  # frees every optimizer's state before the next phase allocates its own
        bw = probe_bytes / results.pop("probe")
        bound = BYTES_PER_PARAM[label] * n / bw
        fastest = min(results.values())
        lines += ["", f"{label}: {BYTES_PER_PARAM[label]} bytes/param; `a.add_(b)` bandwidth "
                      f"{bw / 1e9:.1f} GB/s, so the bound is {bound * 1e3:.1f} ms/step.", "",
                  "| impl | ms/step | Mparams/s | ratio to fastest | fraction of bandwidth bound |",
                  "|---|---:|---:|---:|---:|"]
        for name, t in results.items():
            lines.append(f"| {name} | {t * 1e3:.1f} | {n / t / 1e6:.0f} | "
                         f"{t / fastest:.2f} | {bound / t:.2f} |")
        lines += [f"| {name} | {why} | | | |" for name, why in failed.items()]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
