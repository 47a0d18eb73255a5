"""Where a trainer's batches come from: one protocol, three kinds.

The trainer asks a data object five things and never what type it is:

- ``shard(batch_size=, world=, rank=, accum=, device=)``: this rank's view of the data, made
  once the accelerator exists (``batch_size`` is the global batch of one optimizer step);
- ``steps(epochs)``: optimizer steps in ``epochs`` epochs;
- ``epoch_at(step)``: epochs done after ``step`` optimizer steps (whole at epoch ends);
- ``batches(step)``: this rank's micro-batches from optimizer step ``step`` on, ``accum`` of
  them per step, across epochs, without end;
- ``eval_batches()``: one pass over this rank's share, each example once over all ranks.

The position in the data is a function of the optimizer step alone, so a checkpoint stores
the step and nothing else, and a global batch is the same examples for any number of
processes and accumulation steps (:mod:`toolkit.sampler`). The kinds: :class:`Loader`, a
map-style dataset through a ``DataLoader`` with workers; :class:`DeviceTensors`, whole tensors
on the device with a batched augmentation; and
:class:`~toolkit.lm.data.BPTTData`, a token stream cut for truncated BPTT.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from toolkit.errors import UserError
from toolkit.sampler import GlobalBatchSampler, ShardSampler


class Data(Protocol):
    def shard(self, *, batch_size: int, world: int, rank: int, accum: int,
              device: torch.device) -> Data: ...

    def steps(self, epochs: int) -> int: ...

    def epoch_at(self, step: int) -> float: ...

    def batches(self, step: int) -> Iterator: ...

    def eval_batches(self) -> Iterator: ...


def open_datasets(data_dir: str) -> dict | None:
    """A Hugging Face data set's splits as ``train``/``valid``/``test`` (those it has):
    ``hf:NAME`` through ``load_dataset`` (its local cache, or a local folder), or a folder
    written by ``save_to_disk``; None when ``data_dir`` is neither. Unreadable: one line."""
    d = Path(data_dir)
    if not (data_dir.startswith("hf:") or (d / "dataset_dict.json").is_file()
            or (d / "dataset_info.json").is_file()):
        return None
    import datasets  # here: it takes seconds

    try:
        ds = datasets.load_dataset(data_dir[3:]) if data_dir.startswith("hf:") \
            else datasets.load_from_disk(data_dir)
    except Exception as e:  # noqa: BLE001 - the library's reason, in one line
        raise UserError(f"--data-dir {data_dir}: not a readable datasets data set "
                        f"({(str(e).splitlines() or [type(e).__name__])[0]})") from None
    if isinstance(ds, datasets.Dataset):
        ds = {"train": ds}
    names = {"train": "train", "validation": "valid", "valid": "valid", "test": "test"}
    return {names[k]: v for k, v in ds.items() if k in names}


def mix_seed(*parts: int) -> int:
    """One 63-bit generator seed from several integers (splitmix-style mixing)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class _Sharded:
    """What the map-style and tensor kinds share: the toolkit's global-batch order."""

    sampler: GlobalBatchSampler

    def __init__(self, num_examples: int, shuffle: bool, seed: int):
        self.num_examples, self.shuffle, self.seed = num_examples, shuffle, seed
        self.world = self.rank = None

    def shard(self, *, batch_size: int, world: int, rank: int, accum: int,
              device: torch.device):
        view = copy.copy(self)
        view.sampler = GlobalBatchSampler(self.num_examples, batch_size, world=world, rank=rank,
                                          accum=accum, shuffle=self.shuffle, seed=self.seed)
        view.eval_sampler = ShardSampler(self.num_examples, batch_size // world, world=world,
                                         rank=rank)
        view.world, view.rank, view.accum, view.device = world, rank, accum, torch.device(device)
        view._moved(view.device)
        return view

    def _moved(self, device: torch.device) -> None:
        """Put what the view reads onto ``device`` (nothing, for a map-style dataset)."""

    def steps(self, epochs: int) -> int:
        return epochs * self.sampler.steps_per_epoch

    def epoch_at(self, step: int) -> float:
        return step / self.sampler.steps_per_epoch


class Loader(_Sharded):
    """A map-style ``dataset`` through a ``DataLoader`` with ``num_workers`` workers (decoding
    JPEGs, say), in the toolkit's order: a mid-epoch resume continues at the same batch.

    Worker processes persist across epochs; their seeds come from (``seed``, rank), not from
    the global RNG, so creating the loader never shifts the dropout stream. A dataset whose
    transforms draw random numbers in the workers resumes exactly only if it derives them from
    the index it is given (workers take batches round-robin, so after a resume mid-epoch the
    worker of a batch may change). With ``epoch_keys`` the training batches give the dataset
    ``(epoch, index)`` keys instead of indices, so that its augmentation can be a function of
    the example and its epoch (:class:`~toolkit.data.cars.CarsImages`); evaluation keys stay
    indices. The epoch cannot be a dataset attribute set between epochs: each persistent
    worker holds its own copy of the dataset.
    """

    def __init__(self, dataset: Dataset, *, shuffle: bool = True, seed: int = 0,
                 num_workers: int = 0, collate_fn: Callable | None = None,
                 pin_memory: bool = False, epoch_keys: bool = False):
        super().__init__(len(dataset), shuffle, seed)
        self.dataset, self.num_workers = dataset, num_workers
        self.collate_fn, self.pin_memory = collate_fn, pin_memory
        self.epoch_keys = epoch_keys

    def _loader(self, batch_sampler) -> DataLoader:
        if self.epoch_keys and batch_sampler is self.sampler:
            batch_sampler = _EpochKeys(batch_sampler)
        return DataLoader(self.dataset, batch_sampler=batch_sampler, num_workers=self.num_workers,
                          collate_fn=self.collate_fn, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0,
                          generator=torch.Generator().manual_seed(mix_seed(self.seed, self.rank)))

    def batches(self, step: int) -> Iterator:
        epoch, k = divmod(step, self.sampler.steps_per_epoch)
        loader = self._loader(self.sampler)  # it reads the sampler's position at each iter()
        while True:
            self.sampler.set_position(epoch, k)
            yield from loader
            epoch, k = epoch + 1, 0

    def eval_batches(self) -> Iterator:
        yield from self._loader(self.eval_sampler)


class _EpochKeys:
    """A batch sampler's batches with each index tagged ``(epoch, index)``; the epoch is
    read when an iteration starts (the sampler has its position by then)."""

    def __init__(self, sampler: GlobalBatchSampler):
        self.sampler = sampler

    def __iter__(self):
        epoch = self.sampler.epoch
        for batch in self.sampler:
            yield [(epoch, i) for i in batch]

    def __len__(self) -> int:
        return len(self.sampler)


class Draw:
    """Uniform random numbers in [0, 1) for one micro-batch's examples, drawn as part of a
    draw for the whole global batch from a generator seeded by (seed, step, call): every
    example gets the same numbers whatever the number of processes and accumulation steps,
    and a resumed run draws what the uninterrupted one drew.

    ``draw(*shape)`` returns a ``[micro_batch, *shape]`` tensor on the data's device.
    """

    def __init__(self, seed: int, step: int, part: slice, batch_size: int, device: torch.device):
        self.seed, self.step, self.part = seed, step, part
        self.batch_size, self.device, self.calls = batch_size, device, 0

    def __call__(self, *shape: int) -> torch.Tensor:
        gen = torch.Generator(self.device).manual_seed(mix_seed(self.seed, self.step, self.calls))
        self.calls += 1
        return torch.rand((self.batch_size, *shape), generator=gen,
                          device=self.device)[self.part]


class DeviceTensors(_Sharded):
    """Whole tensors on the device, indexed there: no workers, no host round trip per batch
    (airbench's way; CIFAR-10's 50,000 training images are 150 MB as uint8).

    ``augment(batch, draw)`` turns a micro-batch (a tuple of tensors) into the trained one,
    taking its randomness from ``draw`` (:class:`Draw`), e.g. a random crop and flip as
    whole-batch tensor ops. Evaluation batches are not augmented.
    """

    def __init__(self, *tensors: torch.Tensor, shuffle: bool = True, seed: int = 0,
                 augment: Callable[[tuple, Draw], tuple] | None = None):
        if not tensors or any(len(t) != len(tensors[0]) for t in tensors):
            raise ValueError("DeviceTensors needs tensors of one length, "
                             f"got {[len(t) for t in tensors]}")
        super().__init__(len(tensors[0]), shuffle, seed)
        self.tensors, self.augment = tensors, augment

    def _moved(self, device: torch.device) -> None:
        self.tensors = tuple(t.to(device) for t in self.tensors)

    def batches(self, step: int) -> Iterator[tuple]:
        s = self.sampler
        per_epoch, size = s.steps_per_epoch, s.batch_size
        epoch, k = divmod(step, per_epoch)
        while True:
            order = s.order(epoch).to(self.device)
            for i in range(k, per_epoch):
                batch = order[i * size:(i + 1) * size]
                for a in range(self.accum):
                    part = s.part(a)
                    out = tuple(t[batch[part]] for t in self.tensors)
                    if self.augment is not None:
                        out = self.augment(out, Draw(self.seed, epoch * per_epoch + i, part,
                                                     size, self.device))
                    yield out
            epoch, k = epoch + 1, 0

    def eval_batches(self) -> Iterator[tuple]:
        for batch in self.eval_sampler:  # the eval sampler's order and batches
            idx = torch.tensor(batch, dtype=torch.long, device=self.device)
            yield tuple(t[idx] for t in self.tensors)
