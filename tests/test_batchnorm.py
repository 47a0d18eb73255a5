"""BatchNorm and "N processes equal one" (:mod:`toolkit.batchnorm`), with real launches of
``tests/tiny.py --batchnorm`` (a BatchNorm1d after the first layer; global batch 32, 2 epochs
of 10 steps) and a 2-process gloo check of :class:`AllReduceBatchNorm` against
``nn.BatchNorm`` in float64 on the concatenated batch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import TINY, dumps, free_port, launch
from toolkit import optim
from toolkit.batchnorm import AllReduceBatchNorm, sync_batchnorm

STEPS = 20
BUFFERS = {"1.running_mean", "1.running_var", "1.num_batches_tracked"}


def tiny(tmp, name: str, args: list[str], launcher: str = "python") -> list[dict]:
    launch(TINY, ["--output-dir", str(tmp / name), "--dump", str(tmp / f"{name}.dump"),
                  "--batchnorm", *args], launcher=launcher)
    return dumps(tmp / f"{name}.dump", 1 if launcher == "python" else 2)


def assert_same_run(a: dict, b: dict, keys=None) -> None:
    for k in keys or a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def ema(batches: list, momentum: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.BatchNorm's running (mean, var) after the given (mean, unbiased var) batches."""
    mean, var = torch.zeros(64, dtype=torch.float64), torch.ones(64, dtype=torch.float64)
    for m, v in batches:
        mean, var = (1 - momentum) * mean + momentum * m, (1 - momentum) * var + momentum * v
    return mean, var


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    return tiny(tmp_path_factory.mktemp("one"), "one", [])[0]


@pytest.fixture(scope="module")
def one_accum2(tmp_path_factory):
    return tiny(tmp_path_factory.mktemp("accum"), "accum", ["--grad-accum", "2"])[0]


def test_sync_batchnorm_two_processes_equal_one(one, tmp_path):
    """With --sync-batchnorm each forward normalizes the global batch: weights and running
    statistics equal one process's."""
    ranks = tiny(tmp_path, "two", ["--sync-batchnorm"], launcher="torchrun")
    for k, v in ranks[0]["params"].items():
        assert torch.equal(v, ranks[1]["params"][k]), k
    assert_same_run(ranks[0]["params"], one["params"])
    assert int(one["params"]["1.num_batches_tracked"]) == STEPS


def test_without_sync_each_rank_normalizes_its_micro_batch(one, one_accum2, tmp_path):
    """Without it, 2 processes differ from 1 on the global batch. Their weights equal 1
    process accumulating the same two micro-batches (rank r = accumulation step r), but the
    running statistics are rank 0's micro-batches' alone: DDP broadcasts rank 0's buffers
    before each forward, while the accumulating process updates them with every micro-batch."""
    ranks = tiny(tmp_path, "two", [], launcher="torchrun")
    two = ranks[0]["params"]
    weights = [k for k in two if k not in BUFFERS]
    assert max((two[k] - one["params"][k]).abs().max().item() for k in weights) > 1e-2
    assert_same_run(two, one_accum2["params"], weights)
    for r, d in enumerate(ranks):
        assert len(d["bn_batches"]) == STEPS
        for step, (mean, var) in enumerate(d["bn_batches"]):  # the same micro-batches
            ref = one_accum2["bn_batches"][2 * step + r]
            torch.testing.assert_close(mean, ref[0])
            torch.testing.assert_close(var, ref[1])
    rank0_mean, rank0_var = ema(ranks[0]["bn_batches"])
    for d in ranks:
        torch.testing.assert_close(d["params"]["1.running_mean"].double(), rank0_mean,
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d["params"]["1.running_var"].double(), rank0_var,
                                   rtol=1e-5, atol=1e-6)
        assert int(d["params"]["1.num_batches_tracked"]) == STEPS
    all_mean, _ = ema(one_accum2["bn_batches"])
    torch.testing.assert_close(one_accum2["params"]["1.running_mean"].double(), all_mean,
                               rtol=1e-5, atol=1e-6)
    assert int(one_accum2["params"]["1.num_batches_tracked"]) == 2 * STEPS
    assert (rank0_mean - all_mean).abs().max() > 1e-2


def test_accumulation_splits_the_batch_even_with_sync(one_accum2, tmp_path):
    """2 processes x 2 accumulation steps with --sync-batchnorm normalize the 2 ranks' 8
    examples together, half the global batch: 1 process with --grad-accum 2, buffers too."""
    ranks = tiny(tmp_path, "two", ["--sync-batchnorm", "--grad-accum", "2"],
                 launcher="torchrun")
    assert_same_run(ranks[0]["params"], one_accum2["params"])


# ---- the module itself ------------------------------------------------------------------
# (class, shape of the global batch, momentum, offset of the data): rank 0 takes 4 of the 7
# examples, rank 1 three. An offset of 1e4 against a spread of 2 shows E[x^2] - E[x]^2 or a
# mean rounded to float32.
CASES = [(nn.BatchNorm1d, (7, 3), 0.1, 0.0), (nn.BatchNorm1d, (7, 3, 5), None, 0.0),
         (nn.BatchNorm2d, (7, 3, 4, 5), 0.1, 1e4), (nn.BatchNorm3d, (7, 2, 2, 3, 4), 0.3, -5.0)]


def _check_case(rank: int, cls, shape, momentum, offset) -> None:
    g = torch.Generator().manual_seed(0)  # the same numbers on both ranks
    ref = cls(shape[1], momentum=momentum).double()
    with torch.no_grad():
        ref.weight.copy_(torch.rand(shape[1], generator=g) + 0.5)
        ref.bias.copy_(torch.randn(shape[1], generator=g))
    model = nn.Sequential(cls(shape[1], momentum=momentum))
    model[0].load_state_dict(ref.state_dict())
    bn = sync_batchnorm(model)[0]
    assert isinstance(bn, AllReduceBatchNorm)
    part = slice(0, 4) if rank == 0 else slice(4, None)
    close = dict(rtol=1e-5, atol=1e-5)
    for _ in range(3):
        x = torch.randn(shape, generator=g) * 2 + offset
        dy = torch.randn(shape, generator=g)
        x_ref = x.double().requires_grad_()
        y_ref = ref(x_ref)
        (y_ref * dy).sum().backward()
        x_mine = x[part].clone().requires_grad_()
        y = bn(x_mine)
        (y * dy[part]).sum().backward()
        torch.testing.assert_close(y.double(), y_ref[part], **close)
        torch.testing.assert_close(x_mine.grad.double(), x_ref.grad[part], **close)
        for name in ("weight", "bias"):
            grad = getattr(bn, name).grad.clone()
            dist.all_reduce(grad)  # what DDP does (then divides by the world)
            torch.testing.assert_close(grad.double(), getattr(ref, name).grad, **close)
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(bn, name).double(), getattr(ref, name), **close)
        assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked)
        bn.zero_grad(), ref.zero_grad()
    bn.eval(), ref.eval()
    x = torch.randn(shape, generator=g) + offset
    torch.testing.assert_close(bn(x[part]).double(), ref(x.double())[part], **close)


def _worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        for case in CASES:
            _check_case(rank, *case)
    finally:
        dist.destroy_process_group()


def test_module_matches_batchnorm_on_the_concatenated_batch():
    """Forward, gradients of the input and of the affine weights, running statistics and
    eval output of 2 ranks holding 4 and 3 examples equal nn.BatchNorm on all 7 (float64)."""
    mp.spawn(_worker, args=(free_port(),), nprocs=2)


def test_one_process_is_plain_batchnorm():
    """Without a process group the converted module is nn.BatchNorm, bitwise."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, momentum=None), nn.ReLU())
    synced = sync_batchnorm(copy.deepcopy(plain))
    assert isinstance(synced[1], AllReduceBatchNorm)
    for _ in range(3):
        x = torch.randn(8, 4)
        assert torch.equal(synced(x), plain(x))
    for a, b in zip(synced.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)
    synced.eval(), plain.eval()
    assert torch.equal(synced(x), plain(x))


def test_conversion_keeps_parameters_and_layer_groups():
    """The optimizer is built after conversion from layer groups taken before it: both
    conversions keep the Parameter and buffer objects, so the groups still hold them all."""
    for convert in (sync_batchnorm, nn.SyncBatchNorm.convert_sync_batchnorm):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                              nn.Flatten(), nn.Linear(4, 2))
        layer_groups = [model[0], model[1], model[4]]  # the BatchNorm itself is a group
        params, buffers = list(model.parameters()), list(model.buffers())
        converted = convert(model)
        assert type(converted[1]) is not nn.BatchNorm2d
        assert all(a is b for a, b in zip(converted.parameters(), params, strict=True))
        assert all(a is b for a, b in zip(converted.buffers(), buffers, strict=True))
        groups = optim.param_groups(converted, 0.1, layer_groups=layer_groups,
                                    lr_mults=[0.1, 0.5, 1.0])
        by_param = {id(p): g["lr_mult"] for g in groups for p in g["params"]}
        assert by_param == {id(p): m for grp, m in zip(layer_groups, [0.1, 0.5, 1.0])
                            for p in grp.parameters()}
    bn = nn.BatchNorm1d(3)
    assert isinstance(sync_batchnorm(bn), AllReduceBatchNorm)  # a BatchNorm alone: a new one
    with pytest.raises(ValueError, match="run one forward pass"):
        sync_batchnorm(nn.Sequential(nn.LazyBatchNorm1d()))
