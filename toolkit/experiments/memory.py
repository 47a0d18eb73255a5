"""Memory of the model states (parameters, gradients, optimizer states) per process, for
each strategy: what the device holds and, with offload, what the process's CPU RAM holds.

The arithmetic is the ZeRO paper's (Rajbhandari et al. 2020, sec. 3, Figure 1: Ψ = 7.5B,
N = 64, mixed-precision Adam gives 120 / 31.4 / 16.6 / 1.9 GB for DDP / stages 1, 2, 3);
each strategy's own choices are its ``memory`` (:mod:`toolkit.parallel`):

- DDP (one process is ``ddp`` at world 1): Accelerate's mixed precision is autocast, so
  weights, gradients and optimizer states stay fp32 whatever ``precision`` says.
- ZeRO casts the model to 16 bits under bf16/fp16 and steps an fp32 *master* partition.
  Stages 1-2 clone that partition even in fp32, and so does offload; only stage 3 in fp32
  on the device steps the parameters' own partition.
- FSDP2 shards fp32 weights, gradients and states (bf16 copies of a block live only while
  it is gathered); fsdp2-offload keeps them all in CPU RAM.

Activations, the CUDA context and temporary buffers are not counted (see :data:`NOTES`).

    toolkit memory --params 1.01e9 --world 8 --precision bf16 --optimizer adamw --amsgrad
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from toolkit.distributed import PRECISIONS, Precision
from toolkit.errors import UserError
from toolkit.optim import OptimizerName
from toolkit import parallel
from toolkit.parallel import CONCRETE, Concrete
from toolkit.parallel.base import CATEGORIES, PLACES, STATES  # noqa: F401
MODELS = ("awd-lstm", "awd-qrnn")

NOTES = (
    "ddp: bf16/fp16 is autocast, so weights, gradients and states stay fp32. ZeRO keeps "
    "bf16/fp16 weights and gradients and steps an fp32 master copy (stages 1-2 and offload "
    "clone it in fp32 too). FSDP2 keeps fp32 shards and gathers bf16 copies block by block.",
    "Not counted: activations, the CUDA context, temporary buffers (DDP's gradient buckets, "
    "DeepSpeed's reduce/gather buckets and prefetched ZeRO-3 layers, the fp32 gradient "
    "partition built during a ZeRO step without offload).",
    "Partitions are ceil(params / world); DeepSpeed pads each flat group (stages 1-2) or each "
    "parameter (stage 3) to a multiple of the world size: real counts may be a few elements "
    "higher.",
)


LABELS = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD with momentum"}
"""The optimizers whose states :func:`state_names` knows per parameter."""


def state_names(optimizer: OptimizerName, amsgrad: bool) -> tuple[str, ...]:
    """The per-parameter fp32 states ``optimizer`` keeps (SGD: with momentum, as the toolkit's)."""
    if optimizer == "sgd":
        return ("momentum_buffer",)
    return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())


def check(n_params: int, strategy: str, world: int, precision: str, optimizer: str,
          amsgrad: bool) -> None:
    if isinstance(n_params, bool) or not isinstance(n_params, int) or n_params < 1:
        raise UserError(f"params={n_params!r} must be a whole number >= 1")
    if strategy not in CONCRETE:
        raise UserError(f"strategy {strategy!r} is unknown; choose one of {', '.join(CONCRETE)}")
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise UserError(f"world={world!r} must be a whole number >= 1 (processes)")
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
    if optimizer not in LABELS:
        raise UserError(f"optimizer {optimizer!r} is not one this estimate knows; choose one of "
                        f"{', '.join(LABELS)} (schedulefree-adamw and muon: measure a run)")
    if amsgrad and optimizer == "sgd":
        raise UserError("amsgrad is an Adam/AdamW option; drop it with optimizer sgd")


def estimate(n_params: int, strategy: Concrete, world: int = 1, precision: Precision = "fp32",
             optimizer: OptimizerName = "adamw", amsgrad: bool = False) -> dict[str, int]:
    """Bytes each process holds, keyed ``"device.<category>"`` and ``"cpu.<category>"`` for
    every category in :data:`CATEGORIES`, plus ``"device.total"`` and ``"cpu.total"``.

    ``ddp`` holds as much in each process whatever ``world`` says (one process: ``world=1``).
    Defaults: fp32 AdamW without AMSGrad.
    """
    check(n_params, strategy, world, precision, optimizer, amsgrad)
    out = parallel.memory(strategy, n_params, world, precision,
                          state_names(optimizer, amsgrad))
    for place in PLACES:
        out[f"{place}.total"] = sum(out[f"{place}.{c}"] for c in CATEGORIES)
    return out


def parse_count(text: str) -> int:
    """``"1.01e9"`` -> 1010000000, exactly (no float rounding); whole numbers only."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise UserError(f"--params {text!r} is not a number (e.g. 1.01e9)") from None
    if not value.is_finite() or value != value.to_integral_value() or value < 1:
        raise UserError(f"--params {text} must be a whole number >= 1")
    return int(value)


def model_params(name: str, vocab: int) -> int:
    """Parameters of a ``toolkit.models`` language model, built on the meta device (no memory);
    tied weights count once, as the optimizer sees them."""
    import torch

    from toolkit.lm import AWDLSTM, AWDQRNN

    classes = {"awd-lstm": AWDLSTM, "awd-qrnn": AWDQRNN}
    if name not in classes:
        raise UserError(f"--model {name!r} is unknown; choose one of {', '.join(MODELS)}")
    if vocab < 1:
        raise UserError(f"--vocab {vocab} must be >= 1")
    with torch.device("meta"):
        model = classes[name](vocab)
    return sum(p.numel() for p in model.parameters())


def human(n: int) -> str:
    """Binary units: 2,525,000,000 -> ``2.35 GiB``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def table(n_params: int, world: int = 1, precision: Precision = "fp32",
          optimizer: OptimizerName = "adamw", amsgrad: bool = False,
          strategies: tuple[str, ...] = CONCRETE) -> str:
    """The report ``toolkit memory`` prints: one table per place, a row per strategy."""
    rows = {s: estimate(n_params, s, world, precision, optimizer, amsgrad) for s in strategies}
    label = LABELS[optimizer]
    lines = [f"Model states of {n_params:,} parameters, world {world}, {precision}, {label}"
             f"{' + AMSGrad' if amsgrad else ''}: bytes per process (one process: the ddp row)"]
    titles = {"device": "Per device (GPU/accelerator memory)",
              "cpu": "Per process, CPU memory (offload)"}
    for place in PLACES:
        # Every strategy on the device (zero3-offload's 0 is the point); CPU rows if any.
        shown = [s for s in strategies if place == "device" or rows[s][f"{place}.total"] > 0]
        if not shown:
            continue
        # Only the columns some row fills: no max_exp_avg_sq column without AMSGrad.
        cols = [c for c in CATEGORIES if any(rows[s][f"{place}.{c}"] for s in shown)] + ["total"]
        cells = [[s] + [human(rows[s][f"{place}.{c}"]) if rows[s][f"{place}.{c}"] else "0"
                        for c in cols] for s in shown]
        header = ["strategy", *cols]
        widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]
        fmt = lambda r: "  ".join(v.ljust(widths[i]) if i == 0 else v.rjust(widths[i])
                                  for i, v in enumerate(r))
        lines += ["", titles[place], fmt(header), *map(fmt, cells)]
    return "\n".join([*lines, "", *NOTES])
