"""toolkit.optim against a float64 textbook rule and torch's own optimizers, under 1cycle.

Each trajectory is 200 steps on a few model-like tensors whose gradients depend on the
parameters (errors compound), while :class:`OneCycle` moves lr and beta1 (or momentum)
every step. The reference reads the same lr and beta1 from the param group before each
step, so it checks the update rule, not the schedule (``test_schedule.py`` does that).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from toolkit.errors import UserError
from toolkit.optim import build_optimizer, param_groups
from toolkit.schedule import OneCycle, beta1_of

STEPS = 200
SHAPES = {"linear.weight": (16, 12), "linear.bias": (12,), "conv.weight": (4, 3, 3, 3)}
EPS = 1e-8
BETA2 = 0.99
WD = 0.1  # large, so that decoupled and L2 decay give visibly different trajectories
MAX_LR = {"adam": 0.05, "adamw": 0.05, "sgd": 0.05}
IMPLS = ("fused", "foreach", "forloop")
CASES = [  # (name, amsgrad, nesterov)
    ("adamw", False, False), ("adamw", True, False),
    ("adam", False, False), ("adam", True, False),
    ("sgd", False, False), ("sgd", False, True),
]


def _problem() -> tuple[dict, dict, list[dict]]:
    """Initial params, curvatures/phases of the loss, and per-step noise, all float64."""
    gen = torch.Generator().manual_seed(0)
    init = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()}
    # Curvature in [0.5, 5]: SGD with momentum 0.95 stays stable at lr 0.05.
    curv = {k: 0.5 + 4.5 * torch.rand(s, generator=gen, dtype=torch.float64)
            for k, s in SHAPES.items()}
    phase = {k: 2 * math.pi * torch.rand(s, generator=gen, dtype=torch.float64)
             for k, s in SHAPES.items()}
    # Noise that shrinks with the step: v then falls over the run, which is where AMSGrad's
    # running max departs from Adam.
    noise = [{k: torch.randn(s, generator=gen, dtype=torch.float64) * 2.0 / (1 + t / 20)
              for k, s in SHAPES.items()} for t in range(STEPS)]
    return init, {"curv": curv, "phase": phase}, noise


INIT, LOSS, NOISE = _problem()


def grad(name: str, p: torch.Tensor, t: int) -> torch.Tensor:
    """Gradient of ``curv/2 p^2 + 0.3 sin(2p + phase)/2`` plus step-``t`` noise, in p's dtype."""
    curv, phase, noise = (x.to(p.dtype) for x in (LOSS["curv"][name], LOSS["phase"][name],
                                                    NOISE[t][name]))
    return curv * p + 0.3 * torch.cos(2 * p + phase) + noise


def run_toolkit(name: str, amsgrad: bool, nesterov: bool, impl: str,
                dtype: torch.dtype) -> tuple[dict, list[tuple[float, float]]]:
    """200 steps of build_optimizer + OneCycle; returns final params and the (lr, beta1) used."""
    params = {k: v.to(dtype).clone().requires_grad_() for k, v in INIT.items()}
    opt = build_optimizer(list(params.values()), name, MAX_LR[name], betas=(0.95, BETA2),
                          eps=EPS, weight_decay=WD, amsgrad=amsgrad, nesterov=nesterov,
                          impl=impl)
    sched = OneCycle(opt, STEPS)
    used = []
    for t in range(STEPS):
        group = opt.param_groups[0]
        used.append((float(group["lr"]), beta1_of(group)))
        for k, p in params.items():
            p.grad = grad(k, p.detach(), t)
        opt.step()
        sched.step()
    return {k: p.detach() for k, p in params.items()}, used


def run_textbook(name: str, amsgrad: bool, nesterov: bool,
                 used: list[tuple[float, float]]) -> dict:
    """The update rules written out in float64, with the given (lr, beta1) per step."""
    p = {k: v.clone() for k, v in INIT.items()}
    m = {k: torch.zeros_like(v) for k, v in p.items()}
    v = {k: torch.zeros_like(x) for k, x in p.items()}
    vmax = {k: torch.zeros_like(x) for k, x in p.items()}
    buf = {}
    for t, (lr, beta1) in enumerate(used):
        step = t + 1
        for k in p:
            g = grad(k, p[k], t)
            if name == "sgd":
                g = g + WD * p[k]
                buf[k] = g.clone() if t == 0 else beta1 * buf[k] + g  # beta1 is the momentum
                p[k] = p[k] - lr * (g + beta1 * buf[k] if nesterov else buf[k])
                continue
            if name == "adamw":
                p[k] = p[k] - lr * WD * p[k]
            else:
                g = g + WD * p[k]
            m[k] = beta1 * m[k] + (1 - beta1) * g
            v[k] = BETA2 * v[k] + (1 - BETA2) * g * g
            # torch's AMSGrad: running max of the uncorrected v, then corrected like v.
            vmax[k] = torch.maximum(vmax[k], v[k])
            second = vmax[k] if amsgrad else v[k]
            m_hat = m[k] / (1 - beta1 ** step)
            v_hat = second / (1 - BETA2 ** step)
            p[k] = p[k] - lr * m_hat / (v_hat.sqrt() + EPS)
    return p


def rel_err(a: dict, b: dict) -> float:
    """Largest over tensors of ||a - b|| / ||b||, in float64."""
    return max(((a[k].double() - b[k]).norm() / b[k].norm()).item() for k in b)


@pytest.fixture(scope="module")
def schedules() -> dict:
    """The (lr, beta1) per step that OneCycle gave each case (the same for every impl)."""
    return {case: run_toolkit(*case, "forloop", torch.float64)[1] for case in CASES}


@pytest.fixture(scope="module")
def textbook(schedules) -> dict:
    return {case: run_textbook(*case, schedules[case]) for case in CASES}


def test_schedule_moves_lr_and_beta1(schedules):
    # Otherwise the parity tests below would not cover lr and beta1 changing every step.
    for used in schedules.values():
        lrs, beta1s = zip(*used)
        assert len(set(lrs)) > STEPS // 2 and max(lrs) / min(lrs) > 9
        assert min(beta1s) < 0.86 and max(beta1s) > 0.94


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(
    [c[0]] + ["amsgrad"] * c[1] + ["nesterov"] * c[2]))
def test_float64_matches_textbook(case, impl, textbook):
    params, _ = run_toolkit(*case, impl, torch.float64)
    assert rel_err(params, textbook[case]) < 1e-10


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(
    [c[0]] + ["amsgrad"] * c[1] + ["nesterov"] * c[2]))
def test_float32_close_to_textbook(case, impl, textbook):
    params, _ = run_toolkit(*case, impl, torch.float32)
    assert rel_err(params, textbook[case]) < 1e-4


def test_variants_differ(textbook):
    # A silent downgrade (AMSGrad -> Adam, decoupled -> L2, Nesterov -> plain) must fail the
    # parity tests: the variants have to be far apart compared with the 1e-4 tolerance.
    pairs = [(("adamw", True, False), ("adamw", False, False)),
             (("adam", True, False), ("adam", False, False)),
             (("adamw", False, False), ("adam", False, False)),
             (("adamw", True, False), ("adam", True, False)),
             (("sgd", False, True), ("sgd", False, False))]
    for a, b in pairs:
        assert rel_err(textbook[a], textbook[b]) > 1e-2, (a, b)


def run_torch(name: str, amsgrad: bool, nesterov: bool) -> dict:
    """The same run with torch's optimizer built directly, default impl, float32."""
    params = {k: v.float().clone().requires_grad_() for k, v in INIT.items()}
    lr, plist = MAX_LR[name], list(params.values())
    if name == "sgd":
        opt = torch.optim.SGD(plist, lr=lr, momentum=0.95, nesterov=nesterov, weight_decay=WD)
    else:
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        opt = cls(plist, lr=lr, betas=(0.95, BETA2), eps=EPS, weight_decay=WD,
                  amsgrad=amsgrad)
    sched = OneCycle(opt, STEPS)
    for t in range(STEPS):
        for k, p in params.items():
            p.grad = grad(k, p.detach(), t)
        opt.step()
        sched.step()
    return {k: p.detach().double() for k, p in params.items()}


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(
    [c[0]] + ["amsgrad"] * c[1] + ["nesterov"] * c[2]))
def test_float32_matches_torch(case):
    params, _ = run_toolkit(*case, "auto", torch.float32)
    assert rel_err(params, run_torch(*case)) < 1e-5


def test_auto_is_fused_on_cpu():
    opt = build_optimizer([torch.zeros(3, requires_grad=True)], "adamw")
    assert opt.impl == "fused" and opt.param_groups[0]["fused"] is True


@pytest.mark.parametrize("kwargs", [{"name": "adamw", "amsgrad": True}, {"name": "sgd"},
                                    {"name": "schedulefree-adamw"}])
def test_deepspeed_impl_refuses_what_its_kernel_lacks(kwargs):
    with pytest.raises(ValueError, match="impl='deepspeed'|schedulefree-adamw has"):
        build_optimizer([torch.zeros(3, requires_grad=True)], impl="deepspeed", **kwargs)


# DeepSpeed's CPU kernel: slow, for its op's first build (~1 minute of C++ on 2 cores).
@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c[0] != "sgd" and not c[1]],
                         ids=lambda c: c[0])
def test_deepspeed_float32_close_to_textbook(case, textbook):
    params, _ = run_toolkit(*case, "deepspeed", torch.float32)
    assert rel_err(params, textbook[case]) < 1e-4
    assert rel_err(params, run_torch(*case)) < 1e-5


@pytest.mark.slow
def test_deepspeed_steps_a_large_model_like_fused():
    # 10M parameters: the op's SIMD loop and its OpenMP threads on a real size.
    n = 10_000_000
    gen = torch.Generator().manual_seed(0)
    init, grads = torch.randn(n, generator=gen), [torch.randn(n, generator=gen) for _ in range(3)]
    final = {}
    for impl in ("deepspeed", "fused"):
        p = init.clone().requires_grad_()
        opt = build_optimizer([p], "adamw", 1e-2, weight_decay=0.1, impl=impl)
        for g in grads:
            p.grad = g
            opt.step()
        final[opt.impl] = p.detach()
    # A few float32 roundings apart where v is tiny; a wrong rule would be ~lr = 1e-2 off.
    assert (final["deepspeed"] - final["fused"]).abs().max() < 1e-5


@pytest.mark.slow
def test_deepspeed_steps_channels_last_resumes_exactly_and_loads_into_torch():
    # DeepSpeedCPUAdam hands its op p.contiguous(): a channels-last filter would be updated
    # in a copy and never move. Ours steps it in place, as the contiguous one; a new
    # optimizer from its state_dict goes on bitwise (the op's running powers of the betas
    # would not: it restarts them); its state is torch's, so torch's fused kernel goes on too.
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(8, 3, 3, 3, generator=gen)
    grads = [torch.randn(8, 3, 3, 3, generator=gen) for _ in range(6)]
    runs = {}
    for name, fmt, then in (("cl", torch.channels_last, None),
                            ("contiguous", torch.contiguous_format, None),
                            ("resumed", torch.contiguous_format, "deepspeed"),
                            ("switched", torch.contiguous_format, "fused")):
        p = init.clone(memory_format=fmt).requires_grad_()
        opt = build_optimizer([p], "adamw", 1e-2, weight_decay=0.1, impl="deepspeed")
        for t, g in enumerate(grads):
            if t == 3 and then:
                state = opt.state_dict()
                opt = build_optimizer([p], "adamw", 1e-2, weight_decay=0.1, impl=then)
                opt.load_state_dict(state)
            p.grad = g.clone()
            opt.step()
        runs[name] = p.detach()
    assert runs["cl"].is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(runs["cl"], init)
    # Not bitwise: the op's SIMD loop and its scalar tail round differently, and the two
    # layouts put other elements in the tail.
    assert (runs["cl"] - runs["contiguous"]).abs().max() < 1e-6
    assert torch.equal(runs["resumed"], runs["contiguous"])
    assert (runs["switched"] - runs["contiguous"]).abs().max() < 1e-6


@pytest.mark.slow
def test_deepspeed_refuses_float64_in_one_line():
    opt = build_optimizer([torch.zeros(3, dtype=torch.float64, requires_grad=True)],
                          impl="deepspeed")
    opt.param_groups[0]["params"][0].grad = torch.ones(3, dtype=torch.float64)
    with pytest.raises(UserError, match="torch.float64 on cpu; use --optim.impl fused"):
        opt.step()


def small_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16), nn.LayerNorm(16), nn.Linear(16, 4))


def test_param_groups_no_decay_bias_norm():
    model = small_model()
    groups = param_groups(model, 0.1, no_decay_bias_norm=True)
    by_wd = {wd: {id(p) for g in groups if g["weight_decay"] == wd for p in g["params"]}
             for wd in (0.0, 0.1)}
    decayed = {model[0].weight, model[4].weight, model[6].weight}
    assert by_wd[0.1] == {id(p) for p in decayed}
    assert by_wd[0.0] == {id(p) for p in model.parameters() if p not in decayed}
    assert id(model[1].weight) in by_wd[0.0] and id(model[5].weight) in by_wd[0.0]

    groups = param_groups(model, 0.1, no_decay_bias_norm=False)
    assert [g["weight_decay"] for g in groups] == [0.1]
    assert len(groups[0]["params"]) == len(list(model.parameters()))


def test_layer_groups_lr_mults_keep_ratios_under_one_cycle():
    model = small_model()
    parts = [model[:2], model[2:6], model[6:]]
    groups = param_groups(model, 0.1, layer_groups=parts, lr_mults=(1 / 9, 1 / 3, 1))
    opt = build_optimizer(groups, "adamw", 9e-3)
    owner = {id(p): i for i, part in enumerate(parts) for p in part.parameters()}

    def lr_by_part() -> list[float]:
        found = [set(), set(), set()]
        for g in opt.param_groups:
            parts_of_group = {owner[id(p)] for p in g["params"]}
            assert len(parts_of_group) == 1  # a group never mixes layer groups
            found[parts_of_group.pop()].add(g["lr"])
        assert all(len(lrs) == 1 for lrs in found)  # decay and no-decay groups agree
        return [lrs.pop() for lrs in found]

    assert lr_by_part() == pytest.approx([1e-3, 3e-3, 9e-3])
    sched = OneCycle(opt, 50)
    for _ in range(17):
        opt.step()  # no gradients: changes nothing, but schedulers expect it first
        sched.step()
        lo, mid, hi = lr_by_part()
        assert hi != pytest.approx(9e-3)  # the schedule did move
        assert lo / hi == pytest.approx(1 / 9) and mid / hi == pytest.approx(1 / 3)


@pytest.mark.parametrize("kwargs, value", [
    ({"lr": 0.0}, "lr=0.0"), ({"lr": -1e-3}, "lr=-0.001"),
    ({"betas": (1.0, 0.99)}, "betas[0]=1.0"), ({"betas": (0.9, -0.1)}, "betas[1]=-0.1"),
    ({"eps": 0.0}, "eps=0.0"), ({"name": "lamb"}, "'lamb'"), ({"impl": "triton"}, "'triton'"),
    ({"weight_decay": -0.1}, "weight_decay=-0.1"),
])
def test_bad_values_raise(kwargs, value):
    with pytest.raises(ValueError, match=re.escape(value)):
        build_optimizer([torch.zeros(3, requires_grad=True)], **kwargs)


def run_compiled_vs_forloop(case: tuple, steps: int, check_from: int | None) -> None:
    """``steps`` of compiled vs forloop under OneCycle; no new graph from ``check_from`` on."""
    import torch._dynamo

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters["stats"]
    final = {}
    for impl in ("forloop", "compiled"):
        params = {k: v.float().clone().requires_grad_() for k, v in INIT.items()}
        opt = build_optimizer(list(params.values()), case[0], MAX_LR[case[0]],
                              betas=(0.95, BETA2), weight_decay=WD, amsgrad=case[1],
                              nesterov=case[2], impl=impl)
        sched = OneCycle(opt, steps)
        for t in range(steps):
            if t == check_from:
                graphs = counters["unique_graphs"]
            for k, p in params.items():
                p.grad = grad(k, p.detach(), t)
            opt.step()
            sched.step()
        final[impl] = {k: p.detach().double() for k, p in params.items()}
    assert counters["unique_graphs"] > 0  # it did compile
    if check_from is not None:
        assert counters["unique_graphs"] == graphs  # lr and beta1 moving did not recompile
    assert rel_err(final["compiled"], final["forloop"]) < 1e-5


def test_compiled_adam_matches_forloop_without_recompiling():
    # 15-40 s of inductor compilation on a 2-core CPU with a cold cache. Step 0 compiles
    # (empty state); lr and betas are tensors, so no later step may.
    run_compiled_vs_forloop(("adamw", True, False), steps=20, check_from=1)


def test_compiled_sgd_is_refused():
    # SGD's momentum is a float 1cycle changes every step: compiled, it recompiles every
    # step, and as a tensor torch 2.14.1 keeps a stale value (pytorch#197889).
    with pytest.raises(ValueError, match="compiled"):
        build_optimizer([torch.zeros(3, requires_grad=True)], "sgd", 0.1, impl="compiled")
