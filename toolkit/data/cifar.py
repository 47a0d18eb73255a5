"""CIFAR-10 as uint8 tensors, and the post's augmentation as batched tensor ops on the device.

Loading, :func:`load_cifar10`: a local folder (``--data-dir``) in either official layout,

* the *binary version*, ``cifar-10-batches-bin/``: ``data_batch_{1..5}.bin`` and
  ``test_batch.bin``, 10,000 records each of one label byte and 3,072 pixel bytes (1,024 red,
  1,024 green, 1,024 blue, each 32x32 row-major), plain or gzipped (``.bin.gz``, as the copy
  in ``../shared/data/``), class names in ``batches.meta.txt``;
* the *python version* that torchvision's ``CIFAR10`` reads, ``cifar-10-batches-py/``:
  pickled dicts with ``data`` (uint8, 10,000 x 3,072 in the same order) and ``labels``,
  class names in ``batches.meta``;

(the folder itself or its parent, as torchvision's ``root``), or, without a folder, Hugging
Face ``uoft-cs/cifar10`` (``img`` PNGs and a ``label`` ClassLabel, splits train/test). All give
50,000 training and 10,000 test images, ``[N, 3, 32, 32]`` uint8 in CHW order, in the
official record order for the files. Nothing is cached: the gzipped set decodes in ~1 s.

Augmentation, :class:`PadCropFlip`, as fastai 0.7's ``tfms_from_stats(stats, 32,
aug_tfms=[RandomCrop(32), RandomFlip()], pad=4)`` that the post's ``train_cifar10.py`` used:
pad 4 by reflection (cv2's ``BORDER_REFLECT``, edge pixel repeated), a random 32x32 crop,
a horizontal flip with probability 1/2, then ``(x / 255 - mean) / std`` with the training
set's per-channel statistics (:func:`channel_stats`: (0.4914, 0.4822, 0.4465) /
(0.2470, 0.2435, 0.2616)). It runs on a whole micro-batch where the data lives (two gathers,
no padded copy, no loop per image) and draws its randomness from
:class:`~toolkit.data.source.Draw`, so resume is exact and N processes draw what one does.
Evaluation is normalization only (fastai's validation transform pads and centre-crops back to
the image): :func:`device_data` hands the trainer a test set normalized once, because
``DeviceTensors`` never augments evaluation batches.
"""

from __future__ import annotations

import gzip
import pickle
import zlib
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch

from toolkit.data.source import DeviceTensors, Draw
from toolkit.errors import UserError

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
RECORDS_PER_FILE = 10_000
PIXELS = 3 * 32 * 32
RECORD = 1 + PIXELS  # the binary version: one label byte, then the pixels
HF_REPO = "uoft-cs/cifar10"  # the current hub id of the legacy "cifar10"
HF_SPLITS = {"train": "train", "test": "test"}
HF_IMAGE, HF_LABEL = "img", "label"


class Cifar10(NamedTuple):
    """The data set as tensors: images ``[N, 3, 32, 32]`` uint8, labels ``[N]`` int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]


# ---- loading ----------------------------------------------------------------------------
def load_cifar10(data_dir: str | Path | None, *,
                 records_per_file: int | None = RECORDS_PER_FILE) -> Cifar10:
    """CIFAR-10 from ``data_dir`` (either official layout, or its parent), or from Hugging
    Face when ``data_dir`` is None: ``train_x, train_y, test_x, test_y, classes``.

    Each file must hold ``records_per_file`` images (10,000 in the official release, so a
    file cut at a record boundary is refused too); None accepts any number (subsets).
    """
    if data_dir is None:
        return read_hf()
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise UserError(f"--data-dir {folder} is not a folder; give the folder holding "
                        "cifar-10-batches-bin/ or cifar-10-batches-py/ (or either one itself)")
    for candidate in (folder, folder / "cifar-10-batches-bin", folder / "cifar-10-batches-py"):
        if _binary_path(candidate, TRAIN_FILES[0]) is not None:
            return read_binary(candidate, records_per_file)
        if (candidate / TRAIN_FILES[0]).is_file():
            return read_pickles(candidate, records_per_file)
    raise UserError(f"--data-dir {folder} holds no CIFAR-10: expected data_batch_1..5.bin[.gz] "
                    "and test_batch.bin[.gz] (binary version) or data_batch_1..5 and "
                    "test_batch (python version), there or in cifar-10-batches-{bin,py}/")


def _binary_path(folder: Path, name: str) -> Path | None:
    for path in (folder / f"{name}.bin", folder / f"{name}.bin.gz"):  # plain reads faster
        if path.is_file():
            return path
    return None


def read_binary(folder: Path, records_per_file: int | None = RECORDS_PER_FILE) -> Cifar10:
    """The binary version from ``folder`` (``.bin`` or ``.bin.gz`` files, mixed if need be)."""
    names = (*TRAIN_FILES, TEST_FILE)
    paths = [_binary_path(folder, n) for n in names]
    missing = [f"{n}.bin[.gz]" for n, p in zip(names, paths) if p is None]
    if missing:
        raise UserError(f"--data-dir {folder} lacks {', '.join(missing)} of CIFAR-10's binary "
                        "version")
    parts = [_binary_file(p, records_per_file) for p in paths]
    meta = folder / "batches.meta.txt"
    classes = tuple(meta.read_text().split()) if meta.is_file() else CLASSES
    return _assemble(parts, classes, folder)


def _binary_file(path: Path, records_per_file: int | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # a cut or damaged gzip stream
        raise UserError(f"{path} is truncated or corrupt ({_reason(e)}); replace it") from e
    n, rest = divmod(len(raw), RECORD)
    if rest or n == 0 or (records_per_file is not None and n != records_per_file):
        want = "a whole number of" if records_per_file is None else f"{records_per_file:,}"
        raise UserError(f"{path} holds {len(raw):,} bytes, not {want} {RECORD}-byte records: "
                        "truncated or not CIFAR-10's binary version; replace it")
    records = np.frombuffer(raw, np.uint8).reshape(n, RECORD)
    return records[:, 1:].reshape(n, 3, 32, 32), _labels(records[:, 0], path)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays, lists and strings, and nothing that runs code: a data
    folder should not be able to execute anything (torchvision's ``pickle.load`` would)."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2
               *((m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")  # 1, 2
                 for n in ("_reconstruct", "scalar"))}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it references {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            # latin1: the official files are Python 2 pickles, whose byte strings (the pixels
            # among them) numpy can read back only if each byte decodes to one character
            # (numpy's advice for Python 2 pickles; torchvision loads them the same way).
            d = _ArrayUnpickler(f, encoding="latin1").load()
    except Exception as e:  # EOFError, UnpicklingError, ValueError from numpy: all unusable
        raise UserError(f"{path} is truncated or not a CIFAR-10 pickle ({_reason(e)}); "
                        "replace it") from e
    if not isinstance(d, dict):
        raise UserError(f"{path} is not a CIFAR-10 pickle (it holds a {type(d).__name__})")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def read_pickles(folder: Path, records_per_file: int | None = RECORDS_PER_FILE) -> Cifar10:
    """The python version (torchvision's ``cifar-10-batches-py``) from ``folder``."""
    names = (*TRAIN_FILES, TEST_FILE)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise UserError(f"--data-dir {folder} lacks {', '.join(missing)} of CIFAR-10's python "
                        "version")
    parts = []
    for name in names:
        path = folder / name
        d = _unpickle(path)
        data, labels = d.get("data"), d.get("labels")
        shape = getattr(data, "shape", None)
        n = records_per_file if records_per_file is not None else (shape or (0,))[0]
        if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or shape != (n, PIXELS)
                or labels is None or len(labels) != n or n == 0):
            raise UserError(f"{path} is not a CIFAR-10 batch of {n:,} images (data {shape}, "
                            f"{None if labels is None else len(labels)} labels): truncated or "
                            "another data set; replace it")
        parts.append((data.reshape(n, 3, 32, 32), _labels(np.asarray(labels), path)))
    classes = CLASSES
    if (folder / "batches.meta").is_file():
        label_names = _unpickle(folder / "batches.meta").get("label_names") or CLASSES
        classes = tuple(s.decode() if isinstance(s, bytes) else str(s) for s in label_names)
    return _assemble(parts, classes, folder)


def read_hf() -> Cifar10:
    """CIFAR-10 from the Hugging Face hub (or its local cache): ``uoft-cs/cifar10``."""
    try:
        from datasets import load_dataset  # imported here: it takes a second

        dataset = load_dataset(HF_REPO)
    except Exception as e:  # offline, hub down, no cache: all end the same way
        raise UserError(f"CIFAR-10 is not available from Hugging Face ({_reason(e)}); pass "
                        "--data-dir FOLDER holding cifar-10-batches-bin/ or "
                        "cifar-10-batches-py/") from e
    return arrays_from_hf(dataset)


def arrays_from_hf(dataset) -> Cifar10:
    """The tensors of a ``datasets.DatasetDict`` of CIFAR-10 (``img`` images, ``label``)."""
    parts = []
    for split in HF_SPLITS.values():
        if split not in dataset or {HF_IMAGE, HF_LABEL} - set(dataset[split].column_names):
            raise UserError(f"the Hugging Face CIFAR-10 lacks split {split!r} or its columns "
                            f"{HF_IMAGE!r}/{HF_LABEL!r}")
        xs, ys = [], []
        for batch in dataset[split].with_format("numpy").iter(batch_size=RECORDS_PER_FILE):
            img = np.asarray(batch[HF_IMAGE])
            if img.dtype != np.uint8 or img.shape[1:] != (32, 32, 3):
                raise UserError(f"Hugging Face CIFAR-10 {split} images are {img.dtype} "
                                f"{img.shape[1:]}, not 32x32 RGB uint8")
            xs.append(img.transpose(0, 3, 1, 2))  # HWC pictures to CHW tensors
            ys.append(np.asarray(batch[HF_LABEL]))
        parts.append((np.concatenate(xs), _labels(np.concatenate(ys), f"{HF_REPO} {split}")))
    classes = tuple(dataset[HF_SPLITS["train"]].features[HF_LABEL].names)
    return _assemble([parts[0], parts[1]], classes, HF_REPO, train_files=1)


def _labels(labels: np.ndarray, where) -> np.ndarray:
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise UserError(f"{where} has labels outside 0..9 ({labels.min()}..{labels.max()}); "
                        "it is not CIFAR-10")
    return labels.astype(np.int64)


def _assemble(parts: list[tuple[np.ndarray, np.ndarray]], classes: tuple[str, ...], where,
              train_files: int = len(TRAIN_FILES)) -> Cifar10:
    if len(classes) != len(CLASSES):
        raise UserError(f"{where} names {len(classes)} classes, not CIFAR-10's 10")
    train, test = parts[:train_files], parts[train_files:]
    return Cifar10(torch.from_numpy(np.concatenate([x for x, _ in train])),
                   torch.from_numpy(np.concatenate([y for _, y in train])),
                   torch.from_numpy(np.ascontiguousarray(test[0][0])),
                   torch.from_numpy(test[0][1]), classes)


def _reason(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200] or type(e).__name__


# ---- statistics and normalization -------------------------------------------------------
def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 ``[N, C, H, W]`` images, in [0, 1] units.

    Exact: from each channel's histogram of the 256 values, summed in float64. CIFAR-10's
    training set: (0.4914, 0.4822, 0.4465) and (0.2470, 0.2435, 0.2616).
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"channel_stats takes uint8 images, got {images.dtype}")
    values = torch.arange(256, dtype=torch.float64) / 255
    mean, std = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).cpu().double()
        m = float((counts * values).sum() / counts.sum())
        mean.append(m)
        std.append(float(((counts * (values - m) ** 2).sum() / counts.sum()).sqrt()))
    return tuple(mean), tuple(std)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """``(images / 255 - mean) / std`` per channel, float32: the evaluation transform, and the
    last step of :class:`PadCropFlip` (fastai's order: scale to [0, 1], then normalize)."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return (images.to(torch.float32) / 255 - m) / s


# ---- augmentation -----------------------------------------------------------------------
PadMode = Literal["symmetric", "reflect"]
Offsets = Literal["fastai", "all"]


def padded_index(size: int, pad: int, mode: PadMode = "symmetric") -> torch.Tensor:
    """Source coordinate of each of the ``size + 2 * pad`` coordinates of the padded image.

    ``"symmetric"`` repeats the edge pixel (``dcba|abcd|dcba``): cv2's ``BORDER_REFLECT``,
    fastai 0.7's padding, numpy's ``"symmetric"``; ``"reflect"`` does not (``dcb|abcd|cba``):
    torch's and torchvision's ``"reflect"``, cv2's ``BORDER_REFLECT_101``.
    """
    if not 0 <= pad < size:
        raise ValueError(f"pad={pad} must be in 0..{size - 1} for images of size {size}")
    r = torch.arange(-pad, size + pad)
    edge = 1 if mode == "symmetric" else 0
    r = torch.where(r < 0, -r - edge, r)
    return torch.where(r >= size, 2 * size - 1 - r - (1 - edge), r)


class PadCropFlip:
    """Pad, random crop, random flip: the post's CIFAR-10 training transform (digits crops
    with it too, without the flip) on a micro-batch ``(images, *rest)`` of uint8
    ``[B, C, H, W]`` images, as ``DeviceTensors``' ``augment(batch, draw)``.

    One ``draw(3)`` gives each example its numbers ``(u_row, u_col, u_flip)``: the crop starts
    at row ``floor(u_row * n)`` and column ``floor(u_col * n)`` of the padded image, and the
    crop is flipped left-right when ``u_flip < 0.5`` (fastai's ``RandomCrop`` then
    ``RandomFlip``). ``n`` is ``H + 2 * pad - size``, the 8 starts 0..7 that fastai 0.7's
    ``RandomCrop`` draws (``offsets="fastai"``: its ``floor(rand * (r - sz))`` never reaches
    8), or ``offsets="all"``: ``n + 1``, the 9 of torchvision's ``RandomCrop``. Returns float32
    images normalized with ``mean``/``std`` (the training set's, :func:`channel_stats`),
    ``channels_last`` if asked; the rest of the batch passes through.

    Paper values: pad 4, ``pad_mode="symmetric"`` (cv2's ``BORDER_REFLECT``), size 32, flip.
    """

    def __init__(self, mean, std, *, pad: int = 4, size: int = 32, flip: bool = True,
                 pad_mode: PadMode = "symmetric", offsets: Offsets = "fastai",
                 channels_last: bool = False):
        if pad_mode not in ("symmetric", "reflect"):
            raise ValueError(f"pad_mode={pad_mode!r}; choose 'symmetric' or 'reflect'")
        if offsets not in ("fastai", "all"):
            raise ValueError(f"offsets={offsets!r}; choose 'fastai' or 'all'")
        self.mean, self.std = tuple(mean), tuple(std)
        self.pad, self.size, self.flip = pad, size, flip
        self.pad_mode, self.offsets, self.channels_last = pad_mode, offsets, channels_last
        self._tables: dict[tuple, torch.Tensor] = {}

    def _table(self, length: int, device: torch.device) -> torch.Tensor:
        key = (length, device)
        if key not in self._tables:
            if length + 2 * self.pad < self.size:
                raise ValueError(f"images of size {length} padded by {self.pad} are smaller "
                                 f"than the crop {self.size}")
            self._tables[key] = padded_index(length, self.pad, self.pad_mode).to(device)
        return self._tables[key]

    def crop_indices(self, u: torch.Tensor, height: int, width: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Source row ``[B, size]`` and column ``[B, size]`` of each output pixel, for the
        numbers ``u`` ``[B, 3]`` of :meth:`__call__`."""
        extra = int(self.offsets == "all")
        out = torch.arange(self.size, device=u.device)
        idx = []
        for axis, length in ((0, height), (1, width)):
            n = max(length + 2 * self.pad - self.size + extra, 1)  # crop starts on this axis
            start = (u[:, axis] * n).long().clamp_(max=n - 1)  # u < 1: the clamp is a guard
            idx.append(self._table(length, u.device)[start[:, None] + out])
        rows, cols = idx
        if self.flip:
            cols = torch.where((u[:, 2] < 0.5)[:, None], cols.flip(1), cols)
        return rows, cols

    def crop_flip(self, x: torch.Tensor, draw: Draw) -> torch.Tensor:
        """Pad, crop and flip ``[B, C, H, W]`` images of any dtype (test-time augmentation
        applies it to normalized ones)."""
        b, c, h, w = x.shape
        rows, cols = self.crop_indices(draw(3), h, w)
        # Two gathers (on uint8 images: a quarter of the float traffic): rows, then columns.
        x = x.gather(2, rows[:, None, :, None].expand(b, c, self.size, w))
        return x.gather(3, cols[:, None, None, :].expand(b, c, self.size, self.size))

    def __call__(self, batch: tuple, draw: Draw) -> tuple:
        x, *rest = batch
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"PadCropFlip takes uint8 [B, C, H, W] images, got {x.dtype} "
                             f"{tuple(x.shape)}")
        out = normalize(self.crop_flip(x, draw), self.mean, self.std)
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return (out, *rest)


def hold_out(data: Cifar10, n: int) -> Cifar10:
    """``n`` training images as the evaluation set and the others to train on: a validation
    split to tune on without looking at the test set. The same ``n`` images whatever the
    run's seed (a fixed draw), so every tuning run is scored on the same ones."""
    if not 0 < n < len(data.train_y):
        raise UserError(f"--holdout {n} must be between 1 and {len(data.train_y) - 1} (the "
                        "training images to evaluate on instead of the test set)")
    order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(0))
    valid, train = order[:n].sort().values, order[n:].sort().values
    return data._replace(train_x=data.train_x[train], train_y=data.train_y[train],
                         test_x=data.train_x[valid], test_y=data.train_y[valid])


def device_data(data: Cifar10, *, seed: int = 0, channels_last: bool = False,
                **augment: object) -> tuple[DeviceTensors, DeviceTensors]:
    """Training and test sets for the trainer: the training images stay uint8 on the device
    and are augmented per micro-batch (:class:`PadCropFlip`, ``augment`` its options); the
    test images are normalized once, as float32 (123 MB; evaluation batches are never
    augmented, so they must come normalized). Both use the training set's statistics."""
    mean, std = channel_stats(data.train_x)
    aug = PadCropFlip(mean, std, channels_last=channels_last, **augment)
    test_x = normalize(data.test_x, mean, std)
    if channels_last:
        test_x = test_x.contiguous(memory_format=torch.channels_last)
    return (DeviceTensors(data.train_x, data.train_y, seed=seed, augment=aug),
            DeviceTensors(test_x, data.test_y, shuffle=False))
