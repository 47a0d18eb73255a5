"""Data order owned by the toolkit, so that resume is exact and sharding is visible.

Each epoch is a seeded permutation cut into *global* batches of ``batch_size`` examples
(the last incomplete one dropped). A global batch is split into ``world * accum``
micro-batches: rank ``r`` takes micro-batch ``a * world + r`` for accumulation step ``a``.
So one optimizer step sees the same examples whatever the number of processes or
accumulation steps, and the position in the data is a function of the optimizer step
alone: a checkpoint needs to store nothing more than the step.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from toolkit.distributed import micro_batch
from toolkit.errors import UserError


def micro_part(a: int, world: int, rank: int) -> int:
    """Which of the ``world * accum`` parts of a global batch rank ``rank`` takes at
    accumulation step ``a``: the one split of a global batch, for examples and for a
    language model's columns alike."""
    return a * world + rank


class GlobalBatchSampler:
    """Batch sampler yielding this rank's micro-batches, from any optimizer step on."""

    def __init__(self, num_examples: int, batch_size: int, *, world: int = 1, rank: int = 0,
                 accum: int = 1, shuffle: bool = True, seed: int = 0):
        self.micro = micro_batch(batch_size, world, accum)
        if num_examples < batch_size:
            raise UserError(f"--batch-size {batch_size} is larger than the {num_examples} "
                            "training examples")
        self.num_examples, self.batch_size = num_examples, batch_size
        self.world, self.rank, self.accum = world, rank, accum
        self.shuffle, self.seed = shuffle, seed
        self.epoch, self.start = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    def set_position(self, epoch: int, step_in_epoch: int = 0) -> None:
        """Start the next iteration at optimizer step ``step_in_epoch`` of ``epoch``."""
        self.epoch, self.start = epoch, step_in_epoch

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_examples)
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_examples, generator=gen)

    def part(self, a: int) -> slice:
        """The positions in a global batch that this rank takes at accumulation step ``a``:
        micro-batch ``a * world + rank``."""
        first = micro_part(a, self.world, self.rank) * self.micro
        return slice(first, first + self.micro)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order(self.epoch)
        for step in range(self.start, self.steps_per_epoch):
            batch = order[step * self.batch_size:(step + 1) * self.batch_size]
            for a in range(self.accum):
                yield batch[self.part(a)].tolist()

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start) * self.accum


def eval_shard(num_examples: int, world: int, rank: int) -> range:
    """The examples rank ``rank`` evaluates: every ``world``-th from its rank, so that the
    ranks together see each example exactly once (no padding)."""
    return range(rank, num_examples, world)


class ShardSampler:
    """Evaluation order: :func:`eval_shard`'s examples in batches of ``batch_size``, the same
    number of batches on every rank. Shards differ by one example, and a sharded model gathers
    its parameters in each forward: a rank with one batch more would wait for the others
    forever. So a rank whose shard would make one batch fewer splits it into as many batches
    as the others (sizes differ by one at most)."""

    def __init__(self, num_examples: int, batch_size: int, *, world: int = 1, rank: int = 0):
        self.indices = list(eval_shard(num_examples, world, rank))
        size = max(1, batch_size)
        largest = -(-num_examples // world)  # ceil: the first ranks' shards
        count = -(-largest // size)
        if -(-len(self.indices) // size) == count:
            self.batches = [self.indices[i:i + size] for i in range(0, len(self.indices), size)]
        else:
            # (a shard smaller than the count, at one example per batch, gets fewer: an empty
            # batch would not pass a DataLoader)
            self.batches = [p.tolist() for p in torch.tensor_split(
                torch.tensor(self.indices, dtype=torch.long), count) if len(p)]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches

    def __len__(self) -> int:
        return len(self.batches)
