"""Stanford Cars (196 classes, 8,144 training and 8,041 test images) decoded in DataLoader
workers, with fastai 0.7's side-on augmentation at 224 px, exact on resume.

Two layouts under ``--data-dir DIR``:

1. torchvision's ``StanfordCars`` (``DIR/stanford_cars/`` or ``DIR`` itself):
   ``devkit/cars_meta.mat`` (``class_names``), ``devkit/cars_train_annos.mat`` and
   ``cars_test_annos_withlabels.mat`` (``annotations``: ``bbox_x1, bbox_y1, bbox_x2, bbox_y2,
   class, fname``, classes 1-based), images in ``cars_train/`` and ``cars_test/``. The test
   annotations are also looked for in ``devkit/``, where some copies keep them.
2. an image folder with ``DIR/labels.csv``, header ``filename,label,split``: ``filename``
   relative to ``DIR``, ``label`` a class name or number, ``split`` ``train`` or ``test``.
   One file rather than one per split: a class index must not depend on which split lists
   it first. Classes are the sorted labels (numerically when all are integers), so the
   post's ``annots.csv`` classes 1..196 become 0..195, as torchvision's ``class - 1``.

The post's transforms (sgugger/Adam-experiments ``fit_stanford_cars.py``:
``tfms_from_model(resnet50, 224, aug_tfms=transforms_side_on, max_zoom=1.05)``) are fastai
0.7's ``transforms.py``: for training ``RandomScale(224, 1.05)`` (shorter side to
``int(224 * U(1, 1.05))`` with probability 0.75), ``RandomRotate(10)`` (``U(-10, 10)``
degrees with probability 0.75, reflected border), ``RandomLighting(0.05, 0.05)``,
``RandomFlip()`` (p 0.5), ``RandomCrop(224)``, ImageNet normalization; for evaluation
``Scale(224)`` and ``CenterCrop(224)``. :class:`SideOn` reproduces them with tensor ops:
antialiased bilinear resizing for cv2's INTER_AREA, one ``grid_sample`` for the rotation,
flip and crop (reflection padding is cv2's BORDER_REFLECT), and the lighting's mean taken
before the rotation instead of after (a 10-degree turn with reflected borders barely moves
it).

Why the epoch travels with the index: an example's augmentation comes from a generator
seeded by (seed, epoch, index), never from a global RNG, so it is the same whichever
worker decodes it, with any number of workers, after any resume. The epoch cannot be a
dataset attribute the recipe sets: each persistent worker holds its own copy of the
dataset, pickled when it started. So the training :class:`~toolkit.data.source.Loader` is
made with ``epoch_keys=True``: it hands the dataset the key ``(epoch, index)``, the epoch
read from the batch sampler in the main process when an epoch's iteration starts.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from toolkit.data.source import Loader, mix_seed
from toolkit.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIZE = 224
"""The post's image size (``sz=224``)."""

LAYOUTS = ("torchvision's StanfordCars layout (stanford_cars/devkit/cars_meta.mat, "
           "devkit/cars_train_annos.mat, cars_train/, cars_test/, "
           "cars_test_annos_withlabels.mat) or an image folder with labels.csv "
           "(filename,label,split)")


@dataclass(frozen=True)
class Sample:
    path: str
    label: int
    """Class index, 0-based."""
    box: tuple[int, int, int, int] | None = None
    """The devkit's bounding box (x1, y1, x2, y2), 1-based inclusive pixels; None from a CSV."""


# ---- the two layouts -------------------------------------------------------------------
def read_cars(data_dir: str | Path, split: str) -> tuple[list[Sample], list[str]]:
    """The ``split`` (``train`` or ``test``) of the Stanford Cars copy in ``data_dir`` and the
    class names; a one-line :class:`UserError` when it is not there or incomplete."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: train or test")
    d = Path(data_dir)
    base = next((b for b in (d / "stanford_cars", d)
                 if (b / "devkit" / "cars_meta.mat").is_file()), None)
    if base is not None:
        samples, classes = _read_devkit(base, split)
    elif (d / "labels.csv").is_file():
        samples, classes = _read_csv(d / "labels.csv", split)
    else:
        raise UserError(f"--data-dir {d}: no Stanford Cars there; expected {LAYOUTS}")
    if not samples:
        raise UserError(f"--data-dir {d}: no {split} images listed")
    missing = [s.path for s in samples if not os.path.isfile(s.path)]
    if missing:
        raise UserError(f"--data-dir {d}: {len(missing)} of the {len(samples)} {split} images "
                        f"are missing, the first {missing[0]}")
    return samples, classes


def _loadmat(path: Path, key: str) -> np.ndarray:
    import scipy.io as sio

    try:
        # squeeze_me as torchvision reads them; atleast_1d keeps a one-entry file iterable.
        return np.atleast_1d(sio.loadmat(str(path), squeeze_me=True)[key])
    except KeyError:
        raise UserError(f"{path} has no {key!r} (not a Stanford Cars devkit file)") from None
    except (ValueError, TypeError, OSError) as e:
        raise UserError(f"{path} is not a readable .mat file: {e}") from None


def _read_devkit(base: Path, split: str) -> tuple[list[Sample], list[str]]:
    if split == "train":
        annos, images = base / "devkit" / "cars_train_annos.mat", base / "cars_train"
    else:
        name, images = "cars_test_annos_withlabels.mat", base / "cars_test"
        annos = next((p for p in (base / name, base / "devkit" / name) if p.is_file()),
                     base / name)
    for needed in (annos, images):
        if not needed.exists():
            raise UserError(f"--data-dir {base}: {needed.relative_to(base)} is missing from "
                            f"torchvision's StanfordCars layout")
    classes = [str(c) for c in _loadmat(base / "devkit" / "cars_meta.mat", "class_names")]
    samples = []
    for a in _loadmat(annos, "annotations"):
        fields = a.dtype.names or ()
        if "class" not in fields:
            raise UserError(f"{annos} has no class labels (cars_test_annos.mat without "
                            "labels? use cars_test_annos_withlabels.mat)")
        box = tuple(int(a[f"bbox_{k}"]) for k in ("x1", "y1", "x2", "y2"))
        samples.append(Sample(str(images / str(a["fname"])), int(a["class"]) - 1, box))
    bad = [s.label for s in samples if not 0 <= s.label < len(classes)]
    if bad:
        raise UserError(f"{annos}: class {bad[0] + 1} is outside the {len(classes)} classes "
                        "of devkit/cars_meta.mat")
    return samples, classes


def _read_csv(path: Path, split: str) -> tuple[list[Sample], list[str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    header = set(rows[0]) if rows else set()
    if not {"filename", "label", "split"} <= header:
        raise UserError(f"{path}: the header must name filename,label,split (got "
                        f"{','.join(sorted(header)) or 'nothing'})")
    splits = {r["split"] for r in rows} - {"train", "test"}
    if splits:
        raise UserError(f"{path}: split must be train or test, got {sorted(splits)[0]!r}")
    classes = sorted_labels(r["label"] for r in rows)
    index = {c: i for i, c in enumerate(classes)}
    return ([Sample(str(path.parent / r["filename"]), index[r["label"]])
             for r in rows if r["split"] == split], classes)


def sorted_labels(labels) -> list[str]:
    """The distinct ``labels``, sorted numerically when all are integers, else as text."""
    labels = set(labels)
    numeric = all(s.lstrip("-").isdigit() for s in labels)
    return sorted(labels, key=int if numeric else str)


# ---- transforms ------------------------------------------------------------------------
def _scaled_size(h: int, w: int, shorter: int) -> tuple[int, int]:
    """fastai 0.7's ``scale_min``: the shorter side to ``shorter``, the other in proportion
    (``max(floor(x * ratio), shorter)``)."""
    ratio = shorter / min(h, w)
    return max(math.floor(h * ratio), shorter), max(math.floor(w * ratio), shorter)


def _resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    return TF.resize(img, list(size), antialias=True)


def _normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - m) / s


def eval_image(img: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """fastai 0.7's validation transform: the shorter side of a uint8 ``[3, h, w]`` image
    to ``size``, the center ``size x size`` (offsets rounded up, as fastai's
    ``center_crop``), scaled to [0, 1] and ImageNet-normalized."""
    h, w = _scaled_size(img.shape[-2], img.shape[-1], size)
    x = _resize(img, (h, w))
    r, c = math.ceil((h - size) / 2), math.ceil((w - size) / 2)
    return _normalize(x[:, r:r + size, c:c + size].float() / 255)


def _warp(x: torch.Tensor, zoom: torch.Tensor, deg: torch.Tensor, flip: torch.Tensor,
          crop_r: torch.Tensor, crop_c: torch.Tensor, size: int) -> torch.Tensor:
    """fastai's geometric steps on a batch ``[B, C, H, W]``, as one resampling: zoom to
    ``floor(zoom * (H, W))``, rotate by ``deg`` about the center pixel (cv2's convention:
    counter-clockwise on screen, center ``(W // 2, H // 2)``) with reflected borders, flip,
    and crop ``size x size`` at ``floor(crop * (zoomed - size))``. Each output pixel is
    mapped back through the inverse of each step in turn."""
    b, _, h, w = x.shape
    dev, dt = x.device, torch.float32
    hz, wz = torch.floor(zoom * h), torch.floor(zoom * w)              # [B]
    r0, c0 = torch.floor(crop_r * (hz - size)), torch.floor(crop_c * (wz - size))
    ys = torch.arange(size, device=dev, dtype=dt)[None] + r0[:, None]  # [B, size]
    xs = torch.arange(size, device=dev, dtype=dt)[None] + c0[:, None]
    xs = torch.where(flip[:, None], wz[:, None] - 1 - xs, xs)          # un-flip
    cx, cy = torch.floor(wz / 2), torch.floor(hz / 2)
    dx = (xs - cx[:, None])[:, None, :]                                # [B, 1, size]
    dy = (ys - cy[:, None])[:, :, None]                                # [B, size, 1]
    rad = torch.deg2rad(deg)[:, None, None]
    a, s = torch.cos(rad), torch.sin(rad)
    sx = a * dx - s * dy + cx[:, None, None]                           # un-rotate
    sy = s * dx + a * dy + cy[:, None, None]
    # Un-zoom and normalize for align_corners=False in one go: pixel centers at (i + 0.5) / n.
    gx = (sx + 0.5) / wz[:, None, None] * 2 - 1
    gy = (sy + 0.5) / hz[:, None, None] * 2 - 1
    grid = torch.stack([gx, gy], -1).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False)


@dataclass(frozen=True)
class SideOn:
    """fastai 0.7's ``transforms_side_on`` with ``max_zoom=1.05``, the post's Stanford Cars
    augmentation; defaults are fastai's (``RandomScale`` p 0.75, ``RandomRotate(10)`` p 0.75,
    ``RandomLighting(0.05, 0.05)``, ``RandomFlip`` p 0.5).

    All its randomness is :data:`UNIFORMS` numbers in [0, 1) per example, given by the
    caller: :meth:`image` for one decoded image (in a DataLoader worker), and calling the
    object, ``augment(x, draw)``, for a batch of normalized images on the device (test-time
    augmentation, :mod:`toolkit.tta`)."""

    max_zoom: float = 1.05
    p_zoom: float = 0.75
    max_deg: float = 10.0
    p_rotate: float = 0.75
    brightness: float = 0.05
    contrast: float = 0.05
    p_flip: float = 0.5

    UNIFORMS = 9

    def params(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-example parameters from ``u`` ``[B, 9]``, distributed as fastai draws them."""
        u = u.float()
        c = (2 * u[:, 5] - 1) * self.contrast  # RandomLighting: c < 0 means 1 / (1 - c)
        return {
            "zoom": torch.where(u[:, 0] < self.p_zoom, 1 + (self.max_zoom - 1) * u[:, 1], 1.0),
            "deg": torch.where(u[:, 2] < self.p_rotate, (2 * u[:, 3] - 1) * self.max_deg, 0.0),
            "brightness": (2 * u[:, 4] - 1) * self.brightness,
            "contrast": torch.where(c < 0, -1 / (c - 1), c + 1),
            "flip": u[:, 6] < self.p_flip,
            "crop_r": u[:, 7], "crop_c": u[:, 8],
        }

    @staticmethod
    def _light(x: torch.Tensor, mu: torch.Tensor, p: dict) -> torch.Tensor:
        # fastai's lighting(): (x - mean) * contrast + mean + brightness, clipped to [0, 1].
        b, c = p["brightness"].view(-1, 1, 1, 1), p["contrast"].view(-1, 1, 1, 1)
        return ((x - mu) * c + mu + b).clamp(0, 1)

    def image(self, img: torch.Tensor, u: torch.Tensor, size: int = SIZE) -> torch.Tensor:
        """The training transform of one uint8 ``[3, h, w]`` image with its uniforms ``u``
        ``[9]``: a normalized float ``[3, size, size]``."""
        p = self.params(u[None])
        shorter = int(float(p["zoom"][0]) * size)  # RandomScale: int(mult * sz)
        x = _resize(img, _scaled_size(img.shape[-2], img.shape[-1], shorter)).float()[None] / 255
        one = torch.ones(1)
        out = _warp(x, one, p["deg"], p["flip"], p["crop_r"], p["crop_c"], size)
        return _normalize(self._light(out, x.mean(), p)[0])

    def __call__(self, x: torch.Tensor, draw: Callable[..., torch.Tensor],
                 mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
        """The same augmentation of a batch ``[B, 3, S, S]`` of normalized images (already
        at the eval size: the zoom is done by resampling), numbers from ``draw(9)``. For
        TTA; fastai's ``aug_dl`` cropped the augmented copies from the whole image instead
        of the center crop."""
        p = self.params(draw(self.UNIFORMS).to(x.device))
        m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        img = x * s + m
        out = _warp(img, p["zoom"], p["deg"], p["flip"], p["crop_r"], p["crop_c"], x.shape[-1])
        return (self._light(out, img.mean((1, 2, 3), keepdim=True), p) - m) / s


def decode(path: str) -> torch.Tensor:
    """An image file as uint8 ``[3, h, w]`` RGB (Cars has a few grayscale JPEGs), through PIL
    as torchvision's ``StanfordCars`` loader (torchvision 0.29 deprecates its own decoders)."""
    from PIL import Image

    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


# ---- dataset and loader ----------------------------------------------------------------
class CarsImages(Dataset):
    """Stanford Cars examples as (normalized float ``[3, size, size]``, label).

    With ``augment`` (a :class:`SideOn`) the key is ``(epoch, index)`` (what a
    ``Loader(..., epoch_keys=True)`` passes) and the augmentation's numbers come from a
    generator seeded by (``seed``, epoch, index); without, the key is the index and the image
    gets the eval transform. ``crop_to_box`` first crops to the devkit's bounding box (the post did not).
    """

    def __init__(self, samples: list[Sample], *, size: int = SIZE, augment: SideOn | None = None,
                 seed: int = 0, crop_to_box: bool = False):
        self.samples, self.size, self.augment = samples, size, augment
        self.seed, self.crop_to_box = seed, crop_to_box

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key) -> tuple[torch.Tensor, int]:
        if self.augment is None:
            epoch, index = None, key
        elif isinstance(key, tuple):
            epoch, index = key
        else:
            raise TypeError(f"an augmenting CarsImages takes (epoch, index) keys, got {key!r}: "
                            "read it through Loader(..., epoch_keys=True)")
        sample = self.samples[index]
        img = decode(sample.path)
        if self.crop_to_box and sample.box is not None:
            x1, y1, x2, y2 = sample.box
            img = img[:, max(y1 - 1, 0):y2, max(x1 - 1, 0):x2]
        if self.augment is None:
            return eval_image(img, self.size), sample.label
        gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, index))
        u = torch.rand(SideOn.UNIFORMS, generator=gen)
        return self.augment.image(img, u, self.size), sample.label


def cars_data(data_dir: str | Path, *, size: int = SIZE, seed: int = 0, num_workers: int = 4,
              augment: SideOn | None = SideOn(), crop_to_box: bool = False,
              pin_memory: bool = False) -> tuple[Loader, Loader, list[str]]:
    """The training data (augmented, shuffled with ``seed``), the test data (eval transform,
    in order) and the class names, read from ``data_dir`` (:func:`read_cars`)."""
    train, classes = read_cars(data_dir, "train")
    test, _ = read_cars(data_dir, "test")
    kw = dict(num_workers=num_workers, pin_memory=pin_memory)
    return (Loader(CarsImages(train, size=size, augment=augment, seed=seed,
                              crop_to_box=crop_to_box), seed=seed, epoch_keys=True, **kw),
            Loader(CarsImages(test, size=size, crop_to_box=crop_to_box), shuffle=False, **kw),
            classes)
