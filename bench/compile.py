"""Eager vs ``--compile`` (torch.compile, inductor) for the three model families the toolkit
trains: one training step (forward, loss, backward, AdamW step) on a synthetic batch of the
recipes' ``cpu`` preset shapes, its median time after warm-up, and the compiled warm-up
(the first steps, which compile) beside it. ``--settings`` adds rows for bf16 autocast and
channels-last memory (images only), each against the same model's fp32 eager step.

    python bench/compile.py                          # CPU: ~10 minutes on 2 cores
    python bench/compile.py --models digits --steps 5 --out docs/benchmarks.md
    python bench/compile.py --models resnet9 --settings fp32 channels-last bf16 bf16-channels-last

Each model is built fresh for each mode from the same seed; the compiled one goes through
``nn.Module.compile`` as the trainer's ``--compile`` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from report import device_name, emit  # noqa: E402
from toolkit.optim import build_optimizer  # noqa: E402


def digits(memory_format: torch.memory_format):
    from recipes.digits import convnet

    model, x, y = convnet(32, 0.1), torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    model, x = model.to(memory_format=memory_format), x.contiguous(memory_format=memory_format)
    return model, lambda: F.cross_entropy(model(x), y)


def resnet9(memory_format: torch.memory_format):
    from recipes.cifar10 import build_model

    model = build_model("resnet9", 16).to(memory_format=memory_format)
    x = torch.randn(256, 3, 32, 32).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (256,))
    return model, lambda: F.cross_entropy(model(x), y)


def language_model(kind: str):
    def make(memory_format: torch.memory_format):  # no images: the format does not apply
        from recipes.wt2 import build_model, cpu

        cfg = dataclasses.replace(cpu(), model=kind)
        model = build_model(cfg, 33278)  # WikiText-2's vocabulary
        tokens = torch.randint(0, 33278, (cfg.bptt, cfg.train.batch_size))
        targets = torch.randint(0, 33278, (cfg.bptt, cfg.train.batch_size))
        hidden = model.init_hidden(cfg.train.batch_size)

        def loss():
            logp, _, _, penalty = model(tokens, targets, hidden)
            return -logp.mean() + penalty.ar + penalty.tar
        return model, loss
    return make


MODELS: dict[str, Callable] = {"digits": digits, "resnet9": resnet9,
                               "awd-lstm": language_model("lstm"),
                               "awd-qrnn": language_model("qrnn")}


SETTINGS = {"fp32": (False, torch.contiguous_format),
            "channels-last": (False, torch.channels_last),
            "bf16": (True, torch.contiguous_format),
            "bf16-channels-last": (True, torch.channels_last)}
"""name: (bf16 autocast, memory format of the model and the images)."""


def timed(make: Callable, compile_: bool, warmup: int, steps: int,
          setting: str = "fp32") -> tuple[float, float, int]:
    """(seconds of the first ``warmup`` steps, median seconds per step after, params)."""
    bf16, memory_format = SETTINGS[setting]
    torch.manual_seed(0)
    model, loss_of = make(memory_format)
    model.train()
    if compile_:
        model.compile()
    opt = build_optimizer(model.parameters(), "adamw", 1e-3, weight_decay=0.01)

    def step():
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = loss_of()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(warmup):
        step()
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=20, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    parser.add_argument("--settings", nargs="+", default=["fp32"], choices=list(SETTINGS),
                        help="precision and memory format (rows; ratios against fp32 eager)")
    parser.add_argument("--out", help="also append the markdown to this file")
    args = parser.parse_args()
    import torch._dynamo

    lines = [f"{datetime.date.today()}, {device_name('cpu')}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; median of {args.steps} training steps "
             f"after {args.warmup} (AdamW, fused kernel; batch of the `cpu` presets)",
             f"Command: `python {' '.join(sys.argv)}`", "",
             "| model | params | eager ms/step | compiled ms/step | speed-up | eager first "
             f"{args.warmup} steps s | compiled first {args.warmup} steps s (compiling) | "
             "eager vs fp32 eager | compiled vs fp32 eager |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in args.models:
        base = None
        for setting in args.settings:
            torch._dynamo.reset()
            eager_first, eager, n = timed(MODELS[name], False, args.warmup, args.steps, setting)
            comp_first, comp, _ = timed(MODELS[name], True, args.warmup, args.steps, setting)
            base = base or (eager if setting == "fp32" else
                            timed(MODELS[name], False, args.warmup, args.steps)[1])
            row = name if setting == "fp32" else f"{name}, {setting}"
            lines.append(f"| {row} | {n / 1e6:.2f}M | {eager * 1e3:.1f} | {comp * 1e3:.1f} | "
                         f"{eager / comp:.2f} | {eager_first:.1f} | {comp_first:.1f} | "
                         f"{base / eager:.2f} | {base / comp:.2f} |")
            print(lines[-1], flush=True)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
