"""Configuration: dataclasses with a docstring per field, presets, command-line overrides.

A recipe's config is a dataclass holding ``train: TrainConfig`` (its fields are top-level
flags: ``--epochs``, ``--max-steps``, ``--output-dir``, ``--resume``, ``--seed``,
``--lr-find``), ``optim: OptimConfig`` and ``schedule: ScheduleConfig`` (``--optim.lr=3e-3``,
``--schedule.div=25``) and its own fields. Presets are plain functions returning a config;
``--preset NAME`` picks one, and flags override it. Every value is checked before anything
runs; a bad one stops the run with a one-line message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import math
import os
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import torch
import tyro

from toolkit import optim as optim_lib
from toolkit import schedule as schedule_lib
from toolkit.atomic import write_atomic
from toolkit.distributed import Precision
from toolkit.errors import UserError
from toolkit.optim import Impl, MuonAdjustLr, OptimizerName
from toolkit.parallel import Strategy
from toolkit.target import Target

Tracker = Literal["tensorboard", "wandb", "mlflow", "csv"]  # toolkit/trackers.py
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


@dataclass
class OptimConfig:
    name: OptimizerName = "adamw"
    """adamw: decoupled weight decay (p -= lr*wd*p); adam: L2 (g += wd*p); sgd: momentum + L2;
    schedulefree-adamw: schedule-free AdamW (Defazio et al. 2024; --schedule.shape constant);
    muon: torch's Muon on the hidden weight matrices, AdamW on the rest (one lr, one wd)."""
    lr: float = 3e-3
    """Maximum learning rate of the cycle (pick it with --lr-find)."""
    betas: tuple[float, float] = (0.95, 0.99)
    """Adam betas; beta1 is overwritten by the 1cycle momentum schedule when it cycles."""
    eps: float = 1e-8
    """Adam epsilon."""
    wd: float = 1e-2
    """Weight decay (decoupled for adamw, L2 for adam and sgd)."""
    amsgrad: bool = False
    """AMSGrad: divide by the running maximum of the second moment."""
    momentum: float = 0.9
    """SGD momentum (cycled by the schedule like beta1)."""
    nesterov: bool = False
    """SGD Nesterov momentum."""
    no_decay_bias_norm: bool = True
    """No weight decay on biases and normalization weights."""
    lr_mults: tuple[float, ...] | None = None
    """Discriminative learning rates over the model's layer groups, e.g. (1/9, 1/3, 1)."""
    impl: Impl = "auto"
    """Kernel: auto = fastest correct for the device (fused); compiled = torch.compile'd step;
    deepspeed = DeepSpeed's CPU Adam/AdamW kernel (no AMSGrad; its op compiles once)."""
    warmup_steps: int = 0
    """schedulefree-adamw's own linear warm-up, in optimizer steps (its schedule)."""
    warmup_pct: float = 0.0
    """schedulefree-adamw's warm-up as a share of the run's optimizer steps instead (0.05:
    WSD's default)."""
    muon_adjust_lr: MuonAdjustLr = "match_rms_adamw"
    """muon's lr per matrix: match_rms_adamw (Moonshot's: AdamW's lr and wd fit both),
    original (Keller Jordan's sqrt(max(1, out/in)): wants ~10x AdamW's lr), spectral_unclamped."""

    def validate(self) -> None:
        optim_lib.check_hparams(name=self.name, lr=self.lr, betas=self.betas, eps=self.eps,
                                weight_decay=self.wd, impl=self.impl, momentum=self.momentum,
                                nesterov=self.nesterov, amsgrad=self.amsgrad)
        if self.warmup_steps < 0 or (self.warmup_steps and self.name != "schedulefree-adamw"):
            raise ValueError(f"--optim.warmup-steps={self.warmup_steps} must be >= 0, and is "
                             "schedulefree-adamw's (the other optimizers follow --schedule)")
        if not 0 <= self.warmup_pct < 1 or (self.warmup_pct and (
                self.name != "schedulefree-adamw" or self.warmup_steps)):
            raise ValueError(f"--optim.warmup-pct={self.warmup_pct} must be in [0, 1), without "
                             "--optim.warmup-steps, and is schedulefree-adamw's")
        if self.lr_mults is not None and not (self.lr_mults and all(m > 0 for m in self.lr_mults)):
            raise ValueError(f"--optim.lr-mults={self.lr_mults} must be one value > 0 per layer "
                             "group")

    def write_hparams(self, group: dict, lr_mult: float) -> None:
        """Write these hyperparameters into a param group of the built optimizer (a new
        stage of a run): lr x ``lr_mult``, weight decay where the group ``decay``s."""
        lr = self.lr * lr_mult
        group["initial_lr"], group["lr_mult"] = lr, lr_mult
        schedule_lib.set_lr(group, lr)
        group["weight_decay"] = self.wd if group.get("decay", True) else 0.0
        if "betas" in group:
            for value, new in zip(group["betas"], self.betas):
                if isinstance(value, torch.Tensor):  # the compiled step: in place
                    value.fill_(new)
            if not isinstance(group["betas"][0], torch.Tensor):
                group["betas"] = tuple(self.betas)
            group["eps"] = self.eps
        elif group.get("muon"):
            group["momentum"] = self.betas[0]
        else:
            group["momentum"], group["nesterov"] = self.momentum, self.nesterov

    def check_layer_groups(self, groups: int) -> None:
        """``lr_mults`` must give one value per layer group of the model (``groups``)."""
        if self.lr_mults is not None and len(self.lr_mults) != groups:
            raise UserError(f"--optim.lr-mults has {len(self.lr_mults)} values "
                            f"{self.lr_mults} and this model has {groups} layer group"
                            f"{'s' if groups != 1 else ''}: give {groups} value"
                            f"{'s' if groups != 1 else ''}, or none")

    def build(self, model: torch.nn.Module, layer_groups=None,
              total_steps: int = 0) -> torch.optim.Optimizer:
        """The optimizer of ``model`` for a run of ``total_steps`` (``warmup_pct``'s base)."""
        groups = optim_lib.param_groups(model, self.wd, no_decay_bias_norm=self.no_decay_bias_norm,
                                        layer_groups=layer_groups, lr_mults=self.lr_mults,
                                        muon=self.name == "muon")
        return optim_lib.build_optimizer(groups, self.name, self.lr, betas=self.betas, eps=self.eps,
                                         weight_decay=self.wd, amsgrad=self.amsgrad,
                                         momentum=self.momentum, nesterov=self.nesterov,
                                         impl=self.impl, warmup_steps=self.warmup_steps
                                         or round(self.warmup_pct * total_steps),
                                         muon_adjust_lr=self.muon_adjust_lr)


def _share(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{name}={value} must be in [0, 1]")


def _over_1(name: str, value: float) -> None:
    if not value >= 1:
        raise ValueError(f"{name}={value} must be >= 1")


@dataclass
class FastaiShape:
    """fastai v2's ``fit_one_cycle`` (``--schedule.shape fastai``)."""

    div: float = 25.0
    """Start at lr/div (fastai: 25)."""
    div_final: float = 1e5
    """End at lr/div_final (fastai: 1e5)."""
    pct_start: float = 0.25
    """Share of the run going up, by cosine (fastai: 0.25)."""
    moms: tuple[float, float, float] = (0.95, 0.85, 0.95)
    """beta1 (momentum) at the start, the peak and the end, by cosine (fastai: 0.95 0.85 0.95)."""

    def validate(self) -> None:
        _over_1("--schedule.fastai.div", self.div)
        _over_1("--schedule.fastai.div-final", self.div_final)
        _share("--schedule.fastai.pct-start", self.pct_start)
        if not all(0 <= m < 1 for m in self.moms):
            raise ValueError(f"--schedule.fastai.moms={self.moms} must be three values in [0, 1)")


@dataclass
class FlatCosShape:
    """fastai v2's ``fit_flat_cos`` (``--schedule.shape flat-cos``): flat, then cosine down;
    beta1 stays the optimizer's."""

    pct_start: float = 0.75
    """Share of the run at lr before the cosine (fastai: 0.75)."""
    div_final: float = 1e5
    """End at lr/div_final (fastai: 1e5)."""

    def validate(self) -> None:
        _share("--schedule.flat-cos.pct-start", self.pct_start)
        _over_1("--schedule.flat-cos.div-final", self.div_final)


@dataclass
class TorchShape:
    """torch's ``OneCycleLR`` (``--schedule.shape torch``), with its parameters' names and
    defaults."""

    pct_start: float = 0.3
    """Share of the run going up (torch: 0.3)."""
    div_factor: float = 25.0
    """Start at max_lr/div_factor (torch: 25)."""
    final_div_factor: float = 1e4
    """End at max_lr/div_factor/final_div_factor (torch: 1e4)."""
    anneal_strategy: Literal["cos", "linear"] = "cos"
    """How each phase anneals (torch: cos)."""
    three_phase: bool = False
    """Up, down symmetrically, then annihilate (fastai 0.7's shape; torch: False)."""
    base_momentum: float = 0.85
    """beta1 (momentum) at the lr's peak (torch: 0.85)."""
    max_momentum: float = 0.95
    """beta1 (momentum) at the lr's low ends (torch: 0.95)."""

    def validate(self) -> None:
        if not 0 < self.pct_start < 1:
            raise ValueError(f"--schedule.pytorch.pct-start={self.pct_start} must be in (0, 1)")
        if self.three_phase and not self.pct_start <= 0.5:
            raise ValueError(f"--schedule.pytorch.pct-start={self.pct_start} must be <= 0.5 "
                             "with --schedule.pytorch.three-phase (two phases of that share)")
        _over_1("--schedule.pytorch.div-factor", self.div_factor)
        _over_1("--schedule.pytorch.final-div-factor", self.final_div_factor)
        if not 0 <= self.base_momentum <= self.max_momentum < 1:
            raise ValueError(f"--schedule.pytorch momenta base {self.base_momentum}, max "
                             f"{self.max_momentum} must satisfy 0 <= base <= max < 1")


@dataclass
class WSDShape:
    """Warmup-stable-decay (``--schedule.shape wsd``, Hägele et al. 2024): linear warm-up
    from 0, flat, a short cooldown; beta1 stays the optimizer's."""

    warmup: float = 0.05
    """Share of the run warming up linearly from 0."""
    cooldown: float = 0.2
    """Share of the run cooling down at its end (Hägele et al.: 20% matches cosine)."""
    cooldown_kind: schedule_lib.WSDCooldown = "1-sqrt"
    """linear, cosine or 1-sqrt (their best)."""
    final_frac: float = 0.0
    """lr at the very end as a fraction of lr."""

    def validate(self) -> None:
        _share("--schedule.wsd.warmup", self.warmup)
        _share("--schedule.wsd.cooldown", self.cooldown)
        if self.warmup + self.cooldown > 1:
            raise ValueError(f"--schedule.wsd.warmup={self.warmup} and cooldown="
                             f"{self.cooldown} add up to more than the run")
        _share("--schedule.wsd.final-frac", self.final_frac)


@dataclass
class ScheduleConfig:
    shape: schedule_lib.Shape = "post"
    """post: the post's 1cycle (fastai 0.7; the fields below); fastai: fit_one_cycle; flat-cos:
    fit_flat_cos; torch: OneCycleLR; wsd: warmup-stable-decay; constant. Each shape takes its
    own section (--schedule.fastai.*, --schedule.flat-cos.*, --schedule.pytorch.*,
    --schedule.wsd.*) with its source's defaults."""
    div: float = 10.0
    """The cycle starts and ends its linear part at lr/div (post: 10)."""
    pct: float = 0.1
    """Share of the budget for the final anneal (3-phase cycle)."""
    phases: tuple[float, float, float, float] | None = None
    """4 phases instead: lengths of (up, plateau, down, anneal), e.g. (7.5, 37.5, 37.5, 7.5)."""
    moms: tuple[float, float] = (0.95, 0.85)
    """beta1 (or momentum) at the low and high ends of the lr cycle."""
    lin_end: bool = True
    """Anneal linearly (True) or by cosine (False)."""
    final_frac: float | None = None
    """lr at the very end as a fraction of lr; default 1/(100*div)."""
    cycle_momentum: bool = True
    """Cycle beta1/momentum inversely to the lr (shapes that cycle it: post, fastai, torch)."""
    fastai: FastaiShape = dataclasses.field(default_factory=FastaiShape)
    flat_cos: FlatCosShape = dataclasses.field(default_factory=FlatCosShape)
    pytorch: TorchShape = dataclasses.field(default_factory=TorchShape)
    wsd: WSDShape = dataclasses.field(default_factory=WSDShape)

    def validate(self) -> None:
        schedule_lib.check_one_cycle(self.div, self.pct, self.phases, self.moms, self.final_frac)
        sections = {"fastai": "fastai", "flat_cos": "flat-cos", "pytorch": "torch", "wsd": "wsd"}
        for name, shape in sections.items():
            section = getattr(self, name)
            if shape != self.shape and section != type(section)():
                raise ValueError(f"--schedule.{name.replace('_', '-')}.* is set but "
                                 f"--schedule.shape is {self.shape}; pass --schedule.shape "
                                 f"{shape} or drop those flags")

    def params(self) -> dict:
        """The chosen shape's parameters, named as :mod:`toolkit.schedule` takes them."""
        if self.shape == "fastai":
            return dataclasses.asdict(self.fastai)
        if self.shape == "flat-cos":
            return dataclasses.asdict(self.flat_cos)
        if self.shape == "torch":
            return dataclasses.asdict(self.pytorch)
        if self.shape == "wsd":
            w = self.wsd
            return {"warmup": w.warmup, "cooldown": w.cooldown, "kind": w.cooldown_kind,
                    "final_frac": w.final_frac}
        return {}

    def build(self, optimizer: torch.optim.Optimizer, total_steps: int) -> schedule_lib.OneCycle:
        return schedule_lib.OneCycle(optimizer, total_steps, div=self.div, pct=self.pct,
                                     phases=self.phases, moms=self.moms, lin_end=self.lin_end,
                                     final_frac=self.final_frac,
                                     cycle_momentum=self.cycle_momentum, shape=self.shape,
                                     params=self.params())


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    """Folder for config.json, metrics.jsonl, results.json, checkpoints/ and TensorBoard."""
    epochs: int = 10
    """Training epochs (the cycle spans them)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (the cycle then spans them)."""
    batch_size: int = 128
    """Global batch per optimizer step, over all processes and accumulation steps."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    sync_batchnorm: bool = False
    """Synchronize BatchNorm statistics over processes (SyncBatchNorm): N processes then
    normalize like one process on the whole global batch."""
    clip: float | None = None
    """Clip the global gradient norm to this value."""
    precision: Precision = "fp32"
    """Mixed precision (fp16 uses a loss scaler)."""
    strategy: Strategy = "auto"
    """auto = what the launcher set up (DDP over its processes, or an Accelerate DeepSpeed or
    FSDP2 config); zeroN = DeepSpeed ZeRO stage N; fsdp2 = torch's fully_shard; -offload =
    optimizer state (and zero3/fsdp2 parameters) in CPU memory."""
    deepspeed_config: str | None = None
    """A DeepSpeed JSON to merge into the generated one (extra keys; conflicts are errors)."""
    eval_every: int = 0
    """Evaluate every N optimizer steps; 0 = at the end of each epoch."""
    log_every: int = 10
    """Write train metrics every N optimizer steps."""
    checkpoint_every: int = 0
    """Checkpoint every N optimizer steps (0 = only at the end and on SIGTERM/SIGUSR1)."""
    keep_checkpoints: int = 2
    """Keep the newest K checkpoints (K >= 2: the newest may be mid-write)."""
    resume: str | None = None
    """'auto' (newest complete checkpoint in output_dir, if any) or a checkpoints/step_N path."""
    seed: int = 0
    """Seed for the model init, data order and dropout."""
    lr_find: bool = False
    """Run the LR range test instead of training; writes lr_find.png/json."""
    progress: bool = True
    """Show a progress bar (main process only)."""
    dist_timeout: float = 600.0
    """Seconds a collective waits for the other ranks before the run fails: how long the
    survivors of a dead node wait before they exit (a resume then goes on)."""
    target: str | None = None
    """METRIC=VALUE, e.g. valid_accuracy=0.94 or valid_ppl=70: results.json records the first
    evaluation that reaches it (step, epoch, training seconds), the post's time to target."""
    stop_at_target: bool = False
    """End the run at the first evaluation that reaches --target (DAWNBench's rule)."""
    compile: bool = False
    """torch.compile the model's forward (inductor) before the strategy wraps it, in place
    (checkpoints and model.safetensors keep their keys); FSDP2 compiles each block.
    results.json records compiled_graphs."""
    compile_mode: CompileMode = "default"
    """torch.compile's mode (reduce-overhead: CUDA graphs; max-autotune: slower compile)."""
    trackers: tuple[Tracker, ...] = ("tensorboard",)
    """Where the scalars of metrics.jsonl also go (toolkit/trackers.py): tensorboard, wandb,
    mlflow (MLFLOW_TRACKING_URI), csv (metrics.csv); a resumed run continues the same W&B
    and MLflow run."""
    tracker_project: str | None = None
    """W&B project and MLflow experiment (default: the script's name, e.g. cifar10)."""

    def validate(self) -> None:
        if self.target is not None:
            Target.parse(self.target)
        if self.stop_at_target and self.target is None:
            raise ValueError("--stop-at-target needs --target METRIC=VALUE")
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs} must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps} must be >= 1")
        for name in ("batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.keep_checkpoints < 2:
            raise ValueError(f"keep_checkpoints={self.keep_checkpoints} must be >= 2")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"clip={self.clip} must be > 0")
        if not self.dist_timeout > 0:
            raise ValueError(f"dist_timeout={self.dist_timeout} must be > 0 seconds")
        for name in self.trackers:  # a missing package: refused before anything starts
            if name != "csv":
                try:
                    importlib.import_module(name)
                except ImportError as e:
                    raise ValueError(f"--trackers {name}: {name} does not import ({e}); "
                                     f"pip install {name}") from None


# Sections whose fields are top-level flags (--epochs rather than --train.epochs).
Train = Annotated[TrainConfig, tyro.conf.OmitArgPrefixes]

C = TypeVar("C")


def validate(cfg, prefix: str = "--") -> None:
    """Check that every number in ``cfg`` is finite, then run the ``validate()`` of ``cfg``
    and of every dataclass inside it (``prefix`` spells the flags in messages)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            # TrainConfig's fields are top-level flags (--epochs), the others --section.field.
            validate(value, prefix if isinstance(value, TrainConfig) else f"{prefix}{f.name}.")
            continue
        numbers = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            flag = prefix + f.name.replace("_", "-")
            raise ValueError(f"{flag}={value} is not a finite number")
    if hasattr(cfg, "validate"):
        cfg.validate()


def parse(presets: dict[str, Callable[[], C]], args: Sequence[str] | None = None,
          description: str | None = None, default: str | None = None) -> C:
    """``--preset NAME`` then any field as ``--section.field=value``; validated.

    Raises :class:`UserError` with a one-line message for an unknown preset or a bad value.
    """
    args = list(sys.argv[1:] if args is None else args)
    name = default or next(iter(presets))
    for i, a in enumerate(args):
        if a == "--preset" and i + 1 < len(args):
            name = args[i + 1]
            del args[i:i + 2]
            break
        if a.startswith("--preset="):
            name = a.split("=", 1)[1]
            del args[i]
            break
    if name not in presets:
        raise UserError(f"--preset {name!r} is unknown; choose one of {', '.join(presets)}")
    base = presets[name]()
    description = (description or "") + (f"\n\nPresets: {', '.join(presets)} (--preset NAME; "
                                         f"this help shows {name!r}).")
    args = _local_rank(args)
    if "-h" in args or "--help" in args:
        return tyro.cli(type(base), default=base, args=args, description=description)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
            cfg = tyro.cli(type(base), default=base, args=args, description=description)
    except SystemExit as e:
        if e.code in (0, None):
            raise
        raise UserError(_tyro_message(captured.getvalue())) from None
    try:
        validate(cfg)
    except ValueError as e:
        raise UserError(str(e)) from None
    return cfg


def _local_rank(args: list[str]) -> list[str]:
    """Drop the ``--local_rank``/``--local-rank`` that ``deepspeed`` and old launchers pass
    (into ``LOCAL_RANK``, where torchrun puts it)."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        name, eq, value = a.partition("=")
        if name in ("--local_rank", "--local-rank"):
            if not eq:
                value, i = (args[i + 1] if i + 1 < len(args) else ""), i + 1
            os.environ.setdefault("LOCAL_RANK", value)
        else:
            out.append(a)
        i += 1
    return out


def _tyro_message(text: str) -> str:
    """tyro's error panel (title, rule, message, rule, hint) as its message on one line."""
    sections, current = [], []
    for line in text.splitlines():
        line = line.strip().strip("│╭╮╰╯").strip()
        if line and not line.strip("-─ "):
            sections.append(current)
            current = []
        elif line:
            current.append(line)
    sections.append(current)
    body = next((s for s in sections[1:] if s), None) or sections[0] or ["bad command line"]
    return " ".join(" ".join(body).split()) + " (--help lists every option)"


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[C], data: dict) -> C:
    """The config ``cls`` that :func:`to_dict` turned into ``data`` (a run's config.json):
    nested sections rebuilt, JSON lists back to tuples; fields ``data`` lacks keep their
    defaults (a run from before they existed)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, kind = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            value = from_dict(kind, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON, atomically (:func:`toolkit.atomic.write_atomic`): a
    crash never leaves half a file."""
    write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")

