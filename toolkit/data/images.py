"""Image classification on the user's own images: a folder, a CSV, or a Hugging Face data set.

Under ``--data-dir DIR``, the first that matches:

1. ``DIR/dataset_dict.json`` or ``DIR/dataset_info.json``: a ``datasets`` folder written by
   ``save_to_disk`` (``--data-dir`` may also be ``hf:NAME``, through ``load_dataset``, from
   its local cache: nothing downloads). Splits ``train`` and ``validation``/``valid``
   (else ``--valid-pct``) and ``test``; the image and label columns are found (an ``Image``
   feature, a ``ClassLabel`` one) or named with ``--image-column``/``--label-column``.
2. ``DIR/labels.csv``: ``filename,label[,split]``, filenames relative to ``DIR``, split
   ``train``/``valid``/``test`` (without the column: all train, ``--valid-pct`` held out).
3. an image folder: ``DIR/train/<class>/*`` and ``DIR/valid/<class>/*`` (else
   ``--valid-pct``), optionally ``DIR/test/<class>/*``.

Classes are the training labels, sorted (numerically when all are integers); a data set's
``ClassLabel`` names keep its order. Images of any size and mode (grayscale, RGBA, CMYK,
palette) become RGB. Every image is decoded once before training: an unreadable one is a
one-line error naming the file, or, with ``skip_bad``, left out and counted.
"""

from __future__ import annotations

import csv
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from toolkit.data.cars import SIZE, SideOn, eval_image, sorted_labels
from toolkit.data.source import Loader, mix_seed, open_datasets
from toolkit.errors import UserError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
LAYOUTS = ("a datasets folder (save_to_disk), labels.csv (filename,label[,split]) or an "
           "image folder (train/<class>/*, valid/<class>/*)")


@dataclass(frozen=True)
class Sample:
    source: str | int
    """The image file, or its row in the data set's split."""
    label: int


@dataclass
class Split:
    samples: list[Sample]
    rows: object | None = None
    """The ``datasets`` split the rows index, with ``column`` its images."""
    column: str | None = None

    def name(self, s: Sample) -> str:
        return s.source if isinstance(s.source, str) else f"row {s.source}"

    def decode(self, s: Sample) -> torch.Tensor:
        """The image as uint8 ``[3, h, w]`` RGB."""
        from PIL import Image

        if isinstance(s.source, str):
            with Image.open(s.source) as im:
                return _rgb(im)
        value = self.rows[s.source][self.column]
        if isinstance(value, dict):  # an Image feature read without decoding
            import io

            value = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") \
                else Image.open(value["path"])
        return _rgb(value)


def _rgb(im) -> torch.Tensor:
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        from PIL import Image

        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def _index(split_name: str, pairs: list[tuple[str | int, str]], classes: list[str],
           where: str) -> list[Sample]:
    index = {c: i for i, c in enumerate(classes)}
    for source, label in pairs:
        if label not in index:
            raise UserError(f"{where}: {split_name} label {label!r} ({source}) is not one of "
                            f"the {len(classes)} training classes")
    return [Sample(source, index[label]) for source, label in pairs]


def _folder_pairs(d: Path) -> list[tuple[str, str]]:
    classes = sorted(p for p in d.iterdir() if p.is_dir())
    pairs = []
    for c in classes:
        files = sorted(f for f in c.rglob("*") if f.suffix.lower() in EXTENSIONS)
        if not files:
            raise UserError(f"{c}: class {c.name!r} has no images ({', '.join(EXTENSIONS)})")
        pairs += [(str(f), c.name) for f in files]
    return pairs


def _read_folder(d: Path) -> dict[str, list[tuple[str, str]]]:
    return {split: _folder_pairs(d / split) for split in ("train", "valid", "test")
            if (d / split).is_dir()}


def _read_csv(path: Path) -> dict[str, list[tuple[str, str]]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    header = set(rows[0]) if rows else set()
    if not {"filename", "label"} <= header:
        raise UserError(f"{path}: the header must name filename,label[,split] (got "
                        f"{','.join(sorted(header)) or 'nothing'})")
    out: dict[str, list] = {}
    for r in rows:
        split = r.get("split") or "train"
        if split not in ("train", "valid", "test"):
            raise UserError(f"{path}: split must be train, valid or test, got {split!r}")
        out.setdefault(split, []).append((str(path.parent / r["filename"]), r["label"]))
    return out


def _hf_columns(split, image_column: str | None, label_column: str | None, where: str):
    import datasets

    feats = split.features
    image = image_column or next((k for k, f in feats.items()
                                  if isinstance(f, datasets.Image)), None)
    label = label_column or next((k for k, f in feats.items()
                                  if isinstance(f, datasets.ClassLabel)), None)
    label = label or next((k for k in ("label", "labels") if k in feats), None)
    for what, col, flag in (("image", image, "--image-column"), ("label", label,
                                                                 "--label-column")):
        if col is None or col not in feats:
            raise UserError(f"{where}: no {what} column {col or ''} (columns: "
                            f"{', '.join(feats)}); name it with {flag}")
    return image, label


def check_image_flags(size: int, workers: int, weights: str | None, pretrained: bool) -> None:
    """An image recipe's ``--size``, ``--workers``, ``--weights``/``--no-pretrained`` (cars,
    images); a ValueError that the config turns into one line."""
    if size < 32:
        raise ValueError(f"--size={size} must be >= 32 (a ResNet downsamples 32x)")
    if workers < 0:
        raise ValueError(f"--workers={workers} must be >= 0")
    if weights is not None and not pretrained:
        raise ValueError(f"--weights {weights} with --no-pretrained: choose one")


def read_images(data_dir: str, *, valid_pct: float = 0.2, seed: int = 0,
                image_column: str | None = None, label_column: str | None = None
                ) -> tuple[dict[str, Split], list[str]]:
    """The splits (``train``, ``valid``, maybe ``test``) and the class names of the data at
    ``data_dir`` (see the module docstring); one-line :class:`UserError` for what is wrong."""
    d = Path(data_dir)
    rows, column = open_datasets(data_dir) or {}, None
    if rows:
        if "train" not in rows:
            raise UserError(f"--data-dir {data_dir}: no train split (has {', '.join(rows)})")
        column, label = _hf_columns(rows["train"], image_column, label_column, data_dir)
        feat = rows["train"].features[label]
        names = getattr(feat, "names", None)
        pairs = {k: [(i, names[v] if names else str(v)) for i, v in enumerate(s[label])]
                 for k, s in rows.items()}
        classes = list(names) if names else sorted_labels(l for _, l in pairs["train"])
    elif (d / "labels.csv").is_file():
        pairs = _read_csv(d / "labels.csv")
    elif (d / "train").is_dir():
        pairs = _read_folder(d)
    else:
        raise UserError(f"--data-dir {data_dir}: no images there; expected {LAYOUTS}")
    if not pairs.get("train"):
        raise UserError(f"--data-dir {data_dir}: no training images")
    if column is None:
        classes = sorted_labels(l for _, l in pairs["train"])
        missing = [str(s) for s, _ in pairs["train"] if not Path(s).is_file()]
        if missing:
            raise UserError(f"--data-dir {data_dir}: {len(missing)} listed images are "
                            f"missing, the first {missing[0]}")
    if len(classes) < 2:
        raise UserError(f"--data-dir {data_dir}: one class only ({classes[0]!r}); "
                        "classification needs two or more")
    empty = sorted(set(classes) - {l for _, l in pairs["train"]})
    if empty:
        raise UserError(f"--data-dir {data_dir}: class {empty[0]!r} has no training images")
    splits = {k: Split(_index(k, v, classes, data_dir), rows.get(k), column)
              for k, v in pairs.items()}
    if "valid" not in splits:
        if not 0 < valid_pct < 1:
            raise UserError(f"--data-dir {data_dir} has no valid split: --valid-pct "
                            f"{valid_pct} must be in (0, 1) to hold some training images out")
        train = splits["train"]
        order = list(range(len(train.samples)))
        random.Random(seed).shuffle(order)
        cut = max(1, round(valid_pct * len(order)))
        splits["valid"] = Split([train.samples[i] for i in sorted(order[:cut])], train.rows,
                                column)
        train.samples = [train.samples[i] for i in sorted(order[cut:])]
    return splits, classes


def check_images(splits: dict[str, Split], skip_bad: bool, workers: int = 8) -> list[str]:
    """Decode every image once; an unreadable one is a one-line :class:`UserError` naming it,
    or, with ``skip_bad``, dropped from its split. Returns the names of those dropped."""
    bad = []
    for split in splits.values():
        def readable(s: Sample) -> str | None:
            try:
                split.decode(s)
                return None
            except Exception as e:  # noqa: BLE001 - PIL's many ways to fail
                return (str(e).splitlines() or [type(e).__name__])[0]

        with ThreadPoolExecutor(max(1, workers)) as pool:
            errors = list(pool.map(readable, split.samples))
        for s, err in zip(split.samples, errors):
            if err is not None and not skip_bad:
                raise UserError(f"{split.name(s)}: not a readable image ({err}); fix or remove "
                                "it, or pass --skip-bad-images")
        bad += [split.name(s) for s, err in zip(split.samples, errors) if err is not None]
        split.samples = [s for s, err in zip(split.samples, errors) if err is None]
    for name, split in splits.items():
        if not split.samples:
            raise UserError(f"the {name} split has no readable image left")
    return bad


class Images(Dataset):
    """(normalized float ``[3, size, size]``, label) examples of a :class:`Split`; with
    ``augment`` (a :class:`~toolkit.data.cars.SideOn`) keyed ``(epoch, index)``, its numbers
    from (``seed``, epoch, index): the same after any resume and with any workers."""

    def __init__(self, split: Split, size: int = SIZE, augment: SideOn | None = None,
                 seed: int = 0):
        self.split, self.size, self.augment, self.seed = split, size, augment, seed

    def __len__(self) -> int:
        return len(self.split.samples)

    def __getitem__(self, key):
        epoch, index = key if self.augment is not None else (None, key)
        sample = self.split.samples[index]
        img = self.split.decode(sample)
        if self.augment is None:
            return eval_image(img, self.size), sample.label
        gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, index))
        return self.augment.image(img, torch.rand(SideOn.UNIFORMS, generator=gen),
                                  self.size), sample.label


def image_loaders(splits: dict[str, Split], *, size: int, augment: SideOn | None, seed: int,
                  num_workers: int, pin_memory: bool = False) -> dict[str, Loader]:
    """The training loader (augmented, shuffled with ``seed``) and the others (in order)."""
    kw = dict(num_workers=num_workers, pin_memory=pin_memory)
    out = {"train": Loader(Images(splits["train"], size, augment, seed), seed=seed,
                           epoch_keys=augment is not None, **kw)}
    for name in ("valid", "test"):
        if name in splits:
            out[name] = Loader(Images(splits[name], size), shuffle=False, **kw)
    return out
