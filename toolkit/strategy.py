"""Parallel strategies: one process, DDP, DeepSpeed ZeRO 1/2/3 (+ CPU offload).

The DeepSpeed config is *generated* from the toolkit's own settings (micro-batch,
accumulation, clipping, precision, stage, offload), so the two can never disagree; a user's
DeepSpeed JSON (``--deepspeed-config`` or the one an Accelerate YAML names) is merged in,
and a key that contradicts the toolkit stops the run with a one-line error.

Our optimizers stay ours under ZeRO: DeepSpeed wraps the client torch optimizer (fused
AdamW/Adam, AMSGrad included) around its flat fp32 partitions, so AMSGrad's
``max_exp_avg_sq`` is sharded like ``exp_avg``. ``zero_force_ds_cpu_optimizer`` is off:
with offload, Accelerate and DeepSpeed would otherwise swap in ``DeepSpeedCPUAdam``, which
has no AMSGrad (0.19.8 raises; older releases ignored it silently) and copies only lr and
weight decay.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from toolkit.errors import UserError

STRATEGIES = ("auto", "ddp", "zero1", "zero2", "zero3", "zero2-offload", "zero3-offload")


def parse_strategy(name: str) -> tuple[int, bool]:
    """``(zero stage, offload)``; stage 0 means no DeepSpeed (one process or DDP)."""
    if name not in STRATEGIES:
        raise UserError(f"--strategy {name!r} is unknown; choose one of {', '.join(STRATEGIES)}")
    if not name.startswith("zero"):
        return 0, False
    stage, offload = int(name[4]), name.endswith("-offload")
    return stage, offload


def strategy_name(stage: int, offload: bool) -> str:
    return "ddp" if stage == 0 else f"zero{stage}" + ("-offload" if offload else "")


def from_launcher() -> tuple[str | None, dict | None]:
    """The strategy and DeepSpeed JSON an ``accelerate launch`` config asked for, if any."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None, None
    user = None
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path != "none":
        user = load_json(path)
        zero = user.get("zero_optimization", {})
        stage = zero.get("stage", 2)
        offload = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    else:
        stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
        offload = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") != "none"
    # The launcher's settings are folded into the generated config now; Accelerate would
    # refuse our config beside the YAML's fields (it cannot know they agree).
    os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
    if stage not in (1, 2, 3) or (offload and stage == 1):
        raise UserError(f"the launcher asks for ZeRO stage {stage}"
                        f"{' with offload' if offload else ''}; the toolkit runs stages 1, 2, 3 "
                        "and offload with stages 2 and 3")
    return strategy_name(stage, offload), user


def load_json(path: str | Path) -> dict:
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"DeepSpeed config {path} could not be read: {e}") from None
    for key in ("optimizer", "scheduler"):
        if key in config:
            # DeepSpeed would build its own (FusedAdam/CPUAdam: no AMSGrad) in place of ours.
            raise UserError(f"DeepSpeed config {path} has an {key!r} section; the toolkit sets "
                            f"the optimizer and 1cycle with --optim.* and --schedule.*: remove it")
    return config


def resolve(flag: str, user_json: str | None) -> tuple[str, dict | None]:
    """The strategy to run: the flag, or the launcher's; both given must agree."""
    parse_strategy(flag)
    launched, user = from_launcher()
    if user_json is not None:
        user = load_json(user_json)
    if launched is None:
        return ("ddp" if flag == "auto" else flag), user
    if flag not in ("auto", launched):
        raise UserError(f"--strategy {flag} contradicts the launcher's DeepSpeed config "
                        f"({launched}); drop one of them")
    return launched, user


def deepspeed_config(stage: int, offload: bool, *, micro_batch: int, grad_accum: int, world: int,
                     clip: float | None, precision: str, user: dict | None = None) -> dict:
    """The DeepSpeed JSON for a toolkit run, ``user``'s extra keys merged in."""
    # Stages 1/2 save their optimizer shards unpadded ("elastic"), so that a checkpoint can be
    # re-cut for another number of processes (toolkit.checkpoint.any_world).
    zero: dict = {"stage": stage, **({"elastic_checkpoint": True} if stage < 3 else {})}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world,
        "gradient_clipping": clip or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # Keep the client torch optimizer (fused, AMSGrad) under offload: see module doc.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    return merge(config, user or {})


def merge(ours: dict, user: dict, prefix: str = "") -> dict:
    """``ours`` plus ``user``'s keys; ``"auto"`` takes ours; a different value is an error."""
    out = dict(ours)
    for key, value in user.items():
        name = prefix + key
        if key not in ours or value == "auto":
            if key not in ours:
                out[key] = value
            continue
        if isinstance(value, dict) and isinstance(ours[key], dict):
            out[key] = merge(ours[key], value, name + ".")
        elif value != ours[key]:
            raise UserError(f"DeepSpeed config sets {name}={json.dumps(value)} but the toolkit "
                            f"config gives {json.dumps(ours[key])}; set it through the toolkit's "
                            "flags or write \"auto\"")
    return out


def torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's and DeepSpeed's wrappers: the one that steps."""
    # Accelerate's wrapper is itself a torch Optimizer; torch's own have no `.optimizer`.
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_state_bytes(optimizer) -> dict[str, int]:
    """Bytes of each optimizer state (``exp_avg``, ``exp_avg_sq``, ...) this rank holds."""
    totals: dict[str, int] = {}
    for state in torch_optimizer(optimizer).state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and value.ndim > 0:
                totals[key] = totals.get(key, 0) + value.numel() * value.element_size()
    return totals


def full_state_dict(accelerator, model) -> dict[str, torch.Tensor]:
    """The whole model's parameters on CPU, gathered from ZeRO-3 shards if need be."""
    unwrapped = accelerator.unwrap_model(model)
    if getattr(model, "zero_optimization_stage", lambda: 0)() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(unwrapped.parameters())):
            return {k: v.detach().cpu().clone() for k, v in unwrapped.state_dict().items()}
    return {k: v.detach().cpu().clone() for k, v in unwrapped.state_dict().items()}

