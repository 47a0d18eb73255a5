"""DeepSpeed's CPU Adam/AdamW kernel (the ``cpu_adam`` op behind ``DeepSpeedCPUAdam``) as a
torch optimizer with torch's own state: ``--optim.impl deepspeed``.

Its AVX loop streams each tensor once, with OpenMP threads; on 2 CPU cores it is level with
torch's fused kernel within the run-to-run noise (``docs/benchmarks.md``), so ``auto``
keeps torch's, which needs no build. We call the op ourselves instead of using
``DeepSpeedCPUAdam`` because that class

* hands the op ``p.contiguous()``: a channels-last filter is then updated in a copy, and the
  weight silently never moves; here every tensor goes in as a view in its own memory order;
* keeps ``step`` as a Python int, which torch's fused Adam cannot load; here the state is
  torch's (``step`` a float32 tensor, ``exp_avg``, ``exp_avg_sq``), so a checkpoint loads
  into either kernel;
* leaves the bias correction to the op, which keeps running powers of the betas while they
  stay put and restarts them from a power in a new process: a resumed run would not be
  bitwise the uninterrupted one. Here it is computed from the step each time.

The op has no AMSGrad and no float64; its update is torch's AdamW/Adam in float32 (checked
against the float64 textbook rule in ``tests/test_optim.py``). Building it the first time
compiles C++ (~1 minute on 2 cores, then cached in ``~/.cache/torch_extensions``).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import weakref

import torch

from toolkit.errors import UserError

_ids = itertools.count(10_000)  # clear of DeepSpeedCPUAdam's own ids, which count from 0


@functools.cache
def cpu_adam_op():
    """DeepSpeed's loaded ``cpu_adam`` op (built on first use); a one-line error if not."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        return CPUAdamBuilder().load(verbose=False)
    except Exception as e:  # noqa: BLE001 - a compiler or header missing: many exception types
        raise UserError(f"DeepSpeed's cpu_adam op did not build ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); use --optim.impl fused"
                        ) from e


def memory_order(t: torch.Tensor) -> list[int]:
    """``t``'s dimensions from the largest stride down: ``t.permute`` of it is contiguous
    when ``t`` is dense (channels-last included)."""
    return sorted(range(t.ndim), key=t.stride, reverse=True)


class CPUAdam(torch.optim.Optimizer):
    """Adam (L2, ``adamw=False``) or AdamW through DeepSpeed's CPU kernel."""

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, adamw: bool):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay})
        self.adamw, self.op, self.id = adamw, cpu_adam_op(), next(_ids)
        self.op.create_adam(self.id, lr, *betas, eps, weight_decay, adamw, False)
        weakref.finalize(self, self.op.destroy_adam, self.id)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dtype != torch.float32 or p.device.type != "cpu":
                    # Checked here, not when built: under ZeRO offload the engine swaps in
                    # CPU copies of GPU weights after the optimizer is built.
                    raise UserError(f"--optim.impl deepspeed steps float32 CPU parameters, "
                                    f"not {p.dtype} on {p.device}; use --optim.impl fused")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                # Bias correction folded into lr and eps (and decoupled decay's wd, which the
                # op scales by its lr), from the step every time: the op's own keeps a
                # running product of the betas while they stay put, which a resumed run
                # would restart from a power, and that is not bitwise the same.
                t = int(state["step"])
                bc1, bc2 = 1 - beta1 ** t, math.sqrt(1 - beta2 ** t)
                wd = group["weight_decay"] * (bc1 / bc2 if self.adamw else 1.0)
                # The op writes through its arguments' memory: p and its moments as they are
                # when contiguous (the common case, no per-tensor work), else views in p's
                # memory order (zeros_like and loading keep p's strides; .view raises
                # rather than copy). The gradient is only read: a copy will do.
                tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
                if not all(x.is_contiguous() for x in tensors):
                    order = memory_order(p)
                    tensors = [x.permute(order).reshape(-1) if x is p.grad else
                               x.permute(order).view(-1) for x in tensors]
                p_, g, m, v = tensors
                self.op.adam_update(self.id, t, group["lr"] * bc2 / bc1, beta1, beta2,
                                    group["eps"] * bc2, wd, False, p_, g, m, v)
        return loss
