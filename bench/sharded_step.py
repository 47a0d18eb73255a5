"""The optimizer step inside a DeepSpeed ZeRO-2 engine and over FSDP2's sharded parameters
on one device, vs the bare step.

``engine.step()`` under ZeRO-2 (fp32) steps the toolkit's torch optimizer on DeepSpeed's
flat fp32 partition and copies the result back into the model; under FSDP2
(``fully_shard``) the optimizer steps DTensor shards in place. This measures what each
costs over ``optimizer.step()`` on the same parameters, for AdamW and AMSGrad (the
toolkit's ``auto`` kernel each time), in one process: the GPU if there is one, else CPU.

    python bench/sharded_step.py --params 5e8                  # on a GPU
    python bench/sharded_step.py --params 2e5 --width 64       # a CPU dry run
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
from torch import nn

from toolkit.optim import build_optimizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median_ms(fn, sync, warmup: int = 3, steps: int = 10) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=5e8)
    parser.add_argument("--width", type=int, default=8192)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
        os.environ.setdefault(key, value)
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    import deepspeed
    from torch.distributed.fsdp import fully_shard

    # DeepSpeed's CPU accelerator would ask for oneCCL: gloo, named (as toolkit.parallel.zero).
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    layers = max(1, round(args.params / args.width**2))
    rows = [f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, torch "
            f"{torch.__version__}, deepspeed {deepspeed.__version__}; {layers} x "
            f"Linear({args.width}, {args.width}) = {layers * args.width**2 / 1e6:.1f}M fp32 params",
            "", "| optimizer | bare step ms | ZeRO-2 engine.step ms | ratio | FSDP2 step ms | ratio |",
            "|---|---:|---:|---:|---:|---:|"]

    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Linear(args.width, args.width, bias=False)
                               for _ in range(layers)]).to(device)

    x = torch.randn(1, args.width, device=device)
    for amsgrad in (False, True):
        model = make()
        opt = build_optimizer(model.parameters(), "adamw", 1e-4, amsgrad=amsgrad)
        model(x).square().mean().backward()
        bare = median_ms(opt.step, sync)
        impl = opt.impl
        del opt, model
        m = make()
        engine_opt = build_optimizer(m.parameters(), "adamw", 1e-4, amsgrad=amsgrad)
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
                  "zero_force_ds_cpu_optimizer": False, "steps_per_print": 2**62}
        engine, *_ = deepspeed.initialize(model=m, optimizer=engine_opt, config=config)

        def backward(engine=engine):
            engine.backward(engine(x).square().mean())

        # Time engine.step alone: backward runs between timed calls.
        times = []
        backward()
        for i in range(13):
            sync()
            start = time.perf_counter()
            engine.step()
            sync()
            if i >= 3:
                times.append(time.perf_counter() - start)
            backward()
        zero = 1e3 * statistics.median(times)
        del engine, engine_opt, m, backward  # freed before FSDP2 allocates its copy
        sharded = fully_shard(make())  # the process group deepspeed.initialize started
        opt = build_optimizer(sharded.parameters(), "adamw", 1e-4, amsgrad=amsgrad)
        sharded(x).square().mean().backward()
        fsdp2 = median_ms(opt.step, sync)
        del opt, sharded
        name = "AMSGrad" if amsgrad else "AdamW"
        rows.append(f"| {name} (toolkit {impl}) | {bare:.1f} | {zero:.1f} | {zero / bare:.2f} "
                    f"| {fsdp2:.1f} | {fsdp2 / bare:.2f} |")
        torch.cuda.empty_cache() if device == "cuda" else None
    print("\n".join(rows))


if __name__ == "__main__":
    main()
