"""Adam with decoupled ("true") weight decay or L2, AMSGrad, SGD; parameter groups.

The post (Gugger & Howard, 2018, "AdamW and super-convergence") compares two ways to
regularize Adam:

* L2: ``g += wd * p`` before the moment updates (``torch.optim.Adam(weight_decay=wd)``),
  what its language-model and Stanford Cars runs used;
* decoupled: ``p -= lr * wd * p`` outside the gradient (``torch.optim.AdamW``), ``lr``
  being the *scheduled* learning rate so that decay follows 1cycle.

Both are torch's own optimizers: we only pick the fastest kernel torch has for the device
(``fused`` on CPU and CUDA, AMSGrad included: see ``docs/benchmarks.md``; DeepSpeed's CPU
kernel on request, ``impl="deepspeed"``, ``toolkit.cpu_adam``) and build the parameter
groups. ``impl="compiled"`` wraps ``step`` in ``torch.compile`` with lr and betas
held as tensors, so 1cycle changing them every step never recompiles.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterable, Sequence
from typing import Literal, get_args

import torch
from torch import nn

OptimizerName = Literal["adamw", "adam", "sgd", "schedulefree-adamw", "muon"]
MuonAdjustLr = Literal["match_rms_adamw", "original", "spectral_unclamped"]
Impl = Literal["auto", "fused", "foreach", "forloop", "compiled", "deepspeed"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
IMPLS: tuple[str, ...] = get_args(Impl)
MUON_ADJUST_LR: tuple[str, ...] = get_args(MuonAdjustLr)

# Normalization layers whose weights are scales, not features: decaying them to 0 hurts.
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get no weight decay: biases and normalization weights."""
    names = set()
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p_name.endswith("bias") or isinstance(mod, _NORMS) or p.ndim <= 1:
                names.add(full)
    return names


def hidden_matrices(model: nn.Module) -> set[str]:
    """Names of the weights Muon orthogonalizes (``--optim.name muon``): every parameter of
    2 or more dimensions but embeddings and the output layer (the model's last
    ``nn.Linear``, or all of an adaptive softmax), which stay with AdamW as biases and norms
    do: the split of Keller Jordan's Muon, modded-nanogpt and torch's Muon docs. A conv's
    filters count as one out x (in * kh * kw) matrix, as in airbench94_muon."""
    kept = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    kept |= {id(p) for m in model.modules() if isinstance(m, nn.AdaptiveLogSoftmaxWithLoss)
             for p in m.parameters()}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        kept.add(id(linears[-1].weight))
    return {n for n, p in model.named_parameters() if p.ndim >= 2 and id(p) not in kept}


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    no_decay_bias_norm: bool = True,
    layer_groups: Sequence[nn.Module] | None = None,
    lr_mults: Sequence[float] | None = None,
    muon: bool = False,
) -> list[dict]:
    """Parameter groups with an ``lr_mult``, a ``weight_decay``, their ``layer_group`` index
    and whether they ``decay`` each.

    ``layer_groups`` splits the model into consecutive parts (for discriminative learning
    rates, the post's Stanford Cars run used ``lr_mults=(1/9, 1/3, 1)``); parameters not in
    any listed part join the last one. ``no_decay_bias_norm`` puts biases and normalization
    weights in groups with ``weight_decay=0``. ``muon`` splits off the
    :func:`hidden_matrices` of each part in groups marked ``muon``.
    """
    named = dict(model.named_parameters())
    skip = no_decay_names(model) if no_decay_bias_norm else set()
    if layer_groups is None:
        parts = [list(named)]
    else:
        ids = {id(p): n for n, p in named.items()}
        parts = [[ids[id(p)] for p in g.parameters() if id(p) in ids] for g in layer_groups]
        seen = {n for part in parts for n in part}
        parts[-1] += [n for n in named if n not in seen]
    mults = [1.0] * len(parts) if lr_mults is None else list(lr_mults)
    if len(mults) != len(parts):
        raise ValueError(f"lr_mults has {len(mults)} values for {len(parts)} layer groups")
    hidden = hidden_matrices(model) if muon else set()
    groups = []
    for index, (part, mult) in enumerate(zip(parts, mults)):
        part = [n for n in part if named[n].requires_grad]
        kinds = [([n for n in part if n in hidden], weight_decay, True, True),
                 ([n for n in part if n not in hidden and n not in skip], weight_decay, True,
                  False),
                 ([n for n in part if n not in hidden and n in skip], 0.0, False, False)]
        for names, wd, decay, orthogonal in kinds:
            if names:
                groups.append({"params": [named[n] for n in names], "weight_decay": wd,
                               "lr_mult": mult, "layer_group": index, "decay": decay,
                               **({"muon": orthogonal} if muon else {})})
    return groups


def default_impl(params: Iterable[torch.Tensor], name: str = "adamw") -> str:
    """The fastest exact torch kernel for where the parameters live.

    ``fused`` runs on CPU and CUDA for Adam/AdamW, AMSGrad included, and for SGD: measured
    at 88-100% of the memory-bandwidth bound on a 2-core CPU and ~80% on an H200
    (``docs/benchmarks.md``), 2-5x ahead of foreach and for-loop, and level with DeepSpeed's
    CPU kernel (``--optim.impl deepspeed``) within the run-to-run noise, without its build.
    Other devices: foreach; so is SGD on sharded parameters (FSDP2's DTensors: torch 2.14
    has no sharding rule for its fused kernel).
    """
    from torch.distributed.tensor import DTensor

    params = list(params)
    devices = {p.device.type for p in params}
    if name == "sgd" and any(isinstance(p, DTensor) for p in params):
        return "foreach"
    return "fused" if devices <= {"cpu", "cuda"} else "foreach"


def build_optimizer(
    params: Iterable[torch.Tensor] | Iterable[dict],
    name: OptimizerName = "adamw",
    lr: float = 1e-3,
    *,
    betas: tuple[float, float] = (0.95, 0.99),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    momentum: float = 0.9,
    nesterov: bool = False,
    impl: Impl = "auto",
    warmup_steps: int = 0,
    muon_adjust_lr: MuonAdjustLr = "match_rms_adamw",
) -> torch.optim.Optimizer:
    """Build ``name`` over ``params`` (tensors or groups from :func:`param_groups`).

    ``adamw``: decoupled decay ``p -= lr * wd * p`` (``torch.optim.AdamW``).
    ``adam``: L2, ``g += wd * p`` (``torch.optim.Adam``). ``sgd``: SGD with momentum
    (Nesterov optional) and L2, the post's baseline. ``schedulefree-adamw``: the
    ``schedulefree`` package's ``AdamWScheduleFree`` (Defazio et al. 2024; decoupled decay,
    its own linear warm-up of ``warmup_steps``, no schedule: a constant lr), returned in
    train mode (:func:`averaged_weights` switches it). ``muon``: :class:`Muon` over the
    groups marked ``muon`` (:func:`param_groups`), AdamW over the others, one lr and one wd
    for both (``muon_adjust_lr`` ``match_rms_adamw``, Moonshot's scaling that lets Muon reuse
    AdamW's; ``original`` is Keller Jordan's, which wants a larger lr); Muon's momentum is
    beta1, Nesterov. A group's ``lr_mult`` scales ``lr``. Defaults are the post's: betas
    (0.95, 0.99) at the start of 1cycle, eps 1e-8.
    """
    check_hparams(name=name, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, impl=impl,
                  momentum=momentum, nesterov=nesterov, amsgrad=amsgrad)
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    groups = [{**g, "params": list(g["params"])} for g in groups]
    for g in groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    if name == "schedulefree-adamw":
        import schedulefree

        # foreach: its kernel (no fused one); a float lr, which the scheduler keeps constant.
        opt = schedulefree.AdamWScheduleFree(groups, lr=lr, betas=betas, eps=eps,
                                             weight_decay=weight_decay,
                                             warmup_steps=warmup_steps, foreach=True)
        opt.train()
        opt.impl = "foreach"
        return opt
    if name == "muon":
        hidden = [g for g in groups if g.get("muon")]
        if not hidden:
            raise ValueError("muon found no hidden weight matrix to orthogonalize (its groups "
                             "come from param_groups(..., muon=True)); use adamw")
        muon = Muon(hidden, lr=lr, weight_decay=weight_decay, momentum=betas[0], nesterov=True,
                    adjust_lr_fn=muon_adjust_lr)
        adamw = build_optimizer([g for g in groups if not g.get("muon")], "adamw", lr,
                                betas=betas, eps=eps, weight_decay=weight_decay,
                                amsgrad=amsgrad, impl=impl)
        return MuonWithAdamW(muon, adamw)
    if impl == "auto":
        impl = default_impl((p for g in groups for p in g["params"]), name)
    if impl == "deepspeed":
        from toolkit.cpu_adam import CPUAdam

        opt = CPUAdam(groups, lr, betas, eps, weight_decay, adamw=name == "adamw")
        opt.impl = impl
        return opt
    kernel = {"fused": {"fused": True}, "foreach": {"foreach": True},
              "forloop": {"foreach": False}, "compiled": {"foreach": False}}[impl]
    if name == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov,
                              weight_decay=weight_decay, **kernel)
    else:
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        if impl == "compiled":
            # Tensors, so that torch.compile guards on values, not constants: one graph for
            # the whole run while 1cycle moves lr and beta1 every step.
            for g in groups:
                g["lr"] = torch.tensor(g["lr"])
                g["betas"] = (torch.tensor(betas[0]), torch.tensor(betas[1]))
        opt = cls(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                  amsgrad=amsgrad, **kernel)
    if impl == "compiled":
        # Bound to opt, as a method: LR schedulers re-wrap ``opt.step`` through ``__func__``.
        opt.step = types.MethodType(torch.compile(type(opt).step, fullgraph=False), opt)
    opt.impl = impl  # what was chosen, for logs and benchmarks
    return opt


class Muon(torch.optim.Muon):
    """torch's Muon, for weights of any rank >= 2: a conv's (out, in, kh, kw) filters step
    as one out x (in * kh * kw) matrix (airbench94_muon's flattening)."""

    def __init__(self, params, **kwargs):
        groups = list(params)
        # torch's constructor checks the hyperparameters and sets the defaults but takes 2-D
        # tensors only: build it over a stand-in, then add the real groups.
        super().__init__([torch.zeros(1, 1)], **kwargs)
        self.param_groups.clear()
        for group in groups:
            self.add_param_group(group)

    def _init_group(self, group, params_with_grad, grads, muon_momentum_bufs) -> bool:
        # torch's step updates what this lists in place: 2-D views of each weight and its
        # momentum, flattened in the weight's memory order (channels-last filters too; a
        # permutation of the columns, which orthogonalization commutes with).
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            order = [0, *sorted(range(1, p.ndim), key=p.stride, reverse=True)]
            params_with_grad.append(p.permute(order).view(len(p), -1))
            grads.append(p.grad.permute(order).reshape(len(p), -1))
            muon_momentum_bufs.append(state["momentum_buffer"].permute(order).view(len(p), -1))
        return False


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon over the hidden matrices and AdamW over the rest as one torch optimizer: one
    ``param_groups`` list (the schedule, stages and the LR finder drive every group) and one
    ``state``, so checkpoints, DDP and resume take it as any other."""

    def __init__(self, muon: Muon, adamw: torch.optim.Optimizer):
        self.parts = (muon, adamw)
        super().__init__(muon.param_groups + adamw.param_groups, {})
        self.impl = f"muon+{adamw.impl}"
        self._share()

    def _share(self) -> None:
        muon, adamw = self.parts
        n = len(muon.param_groups)
        muon.param_groups, adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        muon.state = adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._share()  # torch loads into new group dicts and a new state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss


def orthogonalizes(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` steps whole matrices (Muon), which a shard cannot stand for."""
    return any("ns_steps" in g for g in optimizer.param_groups)


def check_hparams(*, name: str, lr: float, betas: tuple[float, float], eps: float,
                  weight_decay: float, impl: str = "auto", momentum: float = 0.9,
                  nesterov: bool = False, amsgrad: bool = False) -> None:
    """Raise a one-line ``ValueError`` naming the first bad value and what is allowed."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")
    if impl not in IMPLS:
        raise ValueError(f"optimizer impl {impl!r} is unknown; choose one of {', '.join(IMPLS)}")
    if not 0 < lr < math.inf:
        raise ValueError(f"lr={lr} must be > 0 and finite")
    for i, b in enumerate(betas):
        if not 0 <= b < 1:
            raise ValueError(f"betas[{i}]={b} must be in [0, 1)")
    if not 0 < eps < math.inf:
        raise ValueError(f"eps={eps} must be > 0 and finite")
    if not 0 <= weight_decay < math.inf:
        raise ValueError(f"weight_decay={weight_decay} must be >= 0 and finite")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum={momentum} must be in [0, 1)")
    if name == "sgd" and impl == "compiled":
        # SGD's momentum is a float that 1cycle changes every step: each step would
        # recompile, and as a tensor torch 2.14 reuses a stale value (pytorch#197889).
        raise ValueError("impl='compiled' is for adam and adamw; sgd uses 'fused' (or auto)")
    if name == "schedulefree-adamw" and (impl not in ("auto", "foreach") or amsgrad):
        raise ValueError("schedulefree-adamw has its own foreach kernel and no AMSGrad; drop "
                         f"--optim.impl {impl}" + (" and --optim.amsgrad" if amsgrad else ""))
    if impl == "deepspeed" and (name not in ("adam", "adamw") or amsgrad):
        raise ValueError(f"impl='deepspeed' (DeepSpeed's CPU kernel) steps adam and adamw "
                         f"without AMSGrad, not {name}{' with amsgrad' if amsgrad else ''}; "
                         "use 'fused' (or auto)")
    if name == "muon" and impl == "compiled":
        raise ValueError("muon has no compiled step (torch's is a loop over matrices); drop "
                         "--optim.impl compiled")
    if name == "sgd" and nesterov and momentum == 0:
        raise ValueError("nesterov=True needs momentum > 0 (momentum=0)")


def schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` keeps a training point and an average (``train()``/``eval()``)."""
    return "train_mode" in optimizer.param_groups[0]


@contextlib.contextmanager
def averaged_weights(optimizer: torch.optim.Optimizer):
    """The weights to evaluate, save and export: a schedule-free optimizer's average ``x``
    (its ``eval()``) inside the block, its training point ``y`` (``train()``) after; yields
    whether it switched. Any other optimizer's weights are the model's own."""
    switch = schedule_free(optimizer)
    if switch:
        optimizer.eval()
    try:
        yield switch
    finally:
        if switch:
            optimizer.train()
