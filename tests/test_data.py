"""The three kinds of data pass the same tests of the protocol (:mod:`toolkit.data.source`):
a resume at any step yields what the uninterrupted iteration yields from there, and the
micro-batches of N processes and A accumulation steps make up the global batch that one
process without accumulation sees (the on-device kind with a random augmentation too)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from toolkit.data.source import DeviceTensors, Draw, Loader
from toolkit.lm.data import BPTTData

N, BATCH, STEPS = 96, 24, 11  # 4 steps per epoch: STEPS crosses two epoch ends
CPU = torch.device("cpu")


def crop_and_flip(batch: tuple, draw: Draw) -> tuple:
    """A random shift and sign flip per example, as batched tensor ops."""
    x, idx = batch
    shift = (draw() * 5).long()
    flip = draw() < 0.5
    x = x + shift[:, None].float()
    return torch.where(flip[:, None], -x, x), idx


class Indexed(Dataset):
    """A map-style dataset that is not a TensorDataset, read by DataLoader workers."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        return torch.full((3,), float(i)), i


def kinds():
    x = torch.arange(N * 3, dtype=torch.float32).view(N, 3)
    ids = torch.arange(20_000) % 997
    return {
        "loader": lambda: Loader(TensorDataset(x, torch.arange(N)), seed=3),
        "loader-workers": lambda: Loader(Indexed(), seed=3, num_workers=2),
        "tensors": lambda: DeviceTensors(x, torch.arange(N), seed=3),
        "tensors-augmented": lambda: DeviceTensors(x, torch.arange(N), seed=3,
                                                   augment=crop_and_flip),
        "bptt": lambda: BPTTData(ids, 20, seed=3, batching="fastai"),
    }


KINDS = kinds()


def shard(kind: str, world: int = 1, rank: int = 0, accum: int = 1):
    return KINDS[kind]().shard(batch_size=BATCH, world=world, rank=rank, accum=accum, device=CPU)


def take(data, start: int, steps: int, accum: int) -> list[list[tuple]]:
    """``steps`` optimizer steps from ``start``: per step, its ``accum`` micro-batches."""
    it = data.batches(start)
    return [[next(it) for _ in range(accum)] for _ in range(steps)]


def global_batch(micro: list[tuple], kind: str) -> list[torch.Tensor]:
    """The micro-batches of a step joined back along the batch dimension."""
    dim = 1 if kind == "bptt" else 0  # BPTT batches are (rows, columns)
    tensors = [[m[i] for m in micro] for i in range(2)]
    return [torch.cat(t, dim) for t in tensors]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("kind", KINDS)
def test_resume_at_any_step_continues_the_same_batches(kind):
    data = shard(kind)
    full = take(data, 0, STEPS, 1)
    for start in (1, 3, 4, 7):  # mid-epoch and at epoch ends
        assert all(same(list(a[0][:2]), list(b[0][:2])) for a, b in
                   zip(take(shard(kind), start, STEPS - start, 1), full[start:])), start


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("world, accum", [(2, 1), (1, 2), (2, 2), (3, 2)])
def test_processes_and_accumulation_make_the_one_process_batch(kind, world, accum):
    one = take(shard(kind), 0, STEPS, 1)
    ranks = [take(shard(kind, world, r, accum), 0, STEPS, accum) for r in range(world)]
    for step in range(STEPS):
        # Micro-batch a of rank r is part a * world + r of the global batch.
        parts = [ranks[r][step][a] for a in range(accum) for r in range(world)]
        assert same(global_batch(parts, kind), global_batch(one[step], kind)), step


def test_augmentation_is_random_and_seeded():
    plain = take(shard("tensors"), 0, 4, 1)
    aug = take(shard("tensors-augmented"), 0, 4, 1)
    again = take(shard("tensors-augmented"), 0, 4, 1)
    assert any(not torch.equal(a[0][0], p[0][0]) for a, p in zip(aug, plain))
    assert all(torch.equal(a[0][0], b[0][0]) for a, b in zip(aug, again))
    # Another seed draws other numbers.
    other = DeviceTensors(*KINDS["tensors"]().tensors, seed=4, augment=crop_and_flip).shard(
        batch_size=BATCH, world=1, rank=0, accum=1, device=CPU)
    assert not torch.equal(take(other, 0, 1, 1)[0][0][0], aug[0][0][0])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_evaluation_sees_every_example_once(kind, world):
    if kind == "bptt":
        data = [BPTTData(torch.arange(600), 7, variable=False, batch_size=6).shard(
            batch_size=BATCH, world=world, rank=r, accum=1, device=CPU) for r in range(world)]
        seen = torch.cat([torch.cat([b[1].reshape(-1) for b in d.eval_batches()]) for d in data])
        assert sorted(seen.tolist()) == sorted(torch.arange(600).view(6, 100)[:, 1:]
                                               .reshape(-1).tolist())
        return
    seen = [int(i) for r in range(world) for b in shard(kind, world, r).eval_batches()
            for i in b[1]]
    assert sorted(seen) == list(range(N))
    if kind == "tensors-augmented":  # evaluation is never augmented
        first = next(shard(kind).eval_batches())
        assert torch.equal(first[0], KINDS["tensors"]().tensors[0][: len(first[0])])


def test_steps_and_epochs():
    for kind in ("loader", "tensors"):
        data = shard(kind)
        assert data.steps(3) == 3 * (N // BATCH)
        assert data.epoch_at(6) == 1.5
    bptt = shard("bptt")
    per_epoch = bptt.streams[0].num_batches(0)
    assert bptt.epoch_at(per_epoch) == 1.0
    assert bptt.steps(2) == per_epoch + bptt.streams[0].num_batches(1)


def test_making_a_loader_leaves_the_global_rng_alone():
    """DataLoader draws its workers' base seed from the global RNG unless given a generator;
    that draw would shift the dropout stream of a resumed run."""
    state = torch.get_rng_state()
    for kind in ("loader", "loader-workers"):
        list(itertools.islice(shard(kind).batches(5), 3))
        list(shard(kind).eval_batches())
    assert torch.equal(torch.get_rng_state(), state)


def test_tensors_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="one length"):
        DeviceTensors(torch.zeros(3), torch.zeros(4))


def test_loader_with_workers_trains_and_resumes_like_device_tensors(tmp_path):
    """End to end (real processes): the DataLoader kind with 2 workers sees the batches the
    on-device kind sees, so the runs are equal, and its resume mid-epoch is exact."""
    from conftest import TINY, dumps, launch

    args = ["--dropout", "0.3", "--epochs", "2", "--checkpoint-every", "7",
            "--keep-checkpoints", "5"]
    launch(TINY, [*args, "--output-dir", str(tmp_path / "t"), "--dump", str(tmp_path / "t")])
    loader = [*args, "--data", "loader", "--workers", "2"]
    launch(TINY, [*loader, "--output-dir", str(tmp_path / "l"), "--dump", str(tmp_path / "l")])
    launch(TINY, [*loader, "--output-dir", str(tmp_path / "r"), "--dump", str(tmp_path / "r"),
                  "--resume", str(tmp_path / "l" / "checkpoints" / "step_7")])
    t, l, r = (dumps(tmp_path / k, 1)[0] for k in "tlr")
    assert t["seen"] == l["seen"] and r["seen"] == l["seen"][7:]
    for k, v in t["params"].items():
        assert torch.equal(v, l["params"][k]) and torch.equal(v, r["params"][k]), k


@pytest.mark.parametrize("n, batch, world", [(8041, 20, 2), (8040, 20, 2), (10, 4, 3),
                                             (10000, 512, 1), (101, 10, 4)])
def test_every_rank_evaluates_in_as_many_batches(n, batch, world):
    """A sharded model (ZeRO-3, FSDP2) gathers its parameters in every forward: one rank with
    a batch more than another would wait forever (8,041 Stanford Cars test images over 2
    ranks in batches of 20 made 202 against 201)."""
    from toolkit.sampler import ShardSampler, eval_shard

    samplers = [ShardSampler(n, batch, world=world, rank=r) for r in range(world)]
    assert len({len(s) for s in samplers}) == 1
    for r, s in enumerate(samplers):
        assert [i for b in s for i in b] == list(eval_shard(n, world, r))
        assert max(len(b) for b in s) <= batch
    if world == 1:  # one process: plain batches of batch_size, in order
        assert all(len(b) == batch for b in samplers[0].batches[:-1])
