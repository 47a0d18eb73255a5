"""Small Stanford Cars copies in the two real layouts, for tests and the ``cpu`` preset.

torchvision's ``StanfordCars`` layout (devkit ``.mat`` files written with
``scipy.io.savemat`` as MATLAB wrote them, JPEGs in ``cars_train/`` and ``cars_test/``) or
an image folder with ``labels.csv``. With ``learnable`` each class has its own colour under
the noise, so a few epochs learn something::

    python tests/cars_sample.py DIR [--layout csv] [--classes 4] [--train 32] [--test 16]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import scipy.io as sio
from PIL import Image

CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Aston Martin V8 Vantage 2012"]
SIZES = [(40, 56), (64, 48), (36, 36), (50, 70), (45, 60), (60, 44)]  # (height, width)


def write_image(path: Path, h: int, w: int, seed: int, gray: bool = False,
                colour: tuple[int, int, int] | None = None) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (h, w) if gray else (h, w, 3), dtype=np.uint8)
    if colour is not None:  # 70% the class's colour (its grey level), 30% noise
        c = np.mean(colour) if gray else np.array(colour)
        pixels = (0.7 * c + 0.3 * pixels).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=95)


def class_colour(label: int, classes: int) -> tuple[int, int, int]:
    hue = label / classes
    return tuple(int(255 * (0.5 + 0.5 * np.cos(2 * np.pi * (hue + k / 3)))) for k in range(3))


def annotations(rows: list[tuple[str, int, tuple[int, ...]]], labels: bool = True) -> np.ndarray:
    """The devkit's struct array: 1 x N, fields bbox_x1..bbox_y2, class (1-based), fname,
    each a MATLAB matrix (uint16 boxes, uint8 class, a char array name), as in the files."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", *(["class"] if labels else []), "fname"]
    arr = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for j, (fname, cls, box) in enumerate(rows):
        for f, v in zip(fields[:4], box):
            arr[f][0, j] = np.array([[v]], dtype=np.uint16)
        if labels:
            arr["class"][0, j] = np.array([[cls]], dtype=np.uint8)
        arr["fname"][0, j] = np.array([fname])
    return arr


def _images(folder: Path, split: str, n: int, classes: int, learnable: bool, scale: int):
    """Write ``n`` images; yield (file name, 1-based class, box, height, width)."""
    folder.mkdir(parents=True, exist_ok=True)
    for j in range(n):
        h, w = (scale * d for d in SIZES[j % len(SIZES)])
        label = j % classes
        fname = f"{j + 1:05d}.jpg"
        write_image(folder / fname, h, w, seed=100 * (split == "test") + j, gray=j == 1,
                    colour=class_colour(label, classes) if learnable else None)
        yield fname, label + 1, (2, 3, w - 1, h - 2)


def devkit_layout(root: Path, n_train: int = 6, n_test: int = 4, classes: list[str] = CLASSES,
                  learnable: bool = False, scale: int = 1) -> Path:
    """torchvision's StanfordCars layout under ``root/stanford_cars``; its folder."""
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    names = np.empty((1, len(classes)), dtype=object)
    for i, c in enumerate(classes):
        names[0, i] = np.array([c])
    sio.savemat(base / "devkit" / "cars_meta.mat", {"class_names": names})
    for split, n, mat in (("train", n_train, base / "devkit" / "cars_train_annos.mat"),
                          ("test", n_test, base / "cars_test_annos_withlabels.mat")):
        rows = [(f, c, box) for f, c, box in
                _images(base / f"cars_{split}", split, n, len(classes), learnable, scale)]
        sio.savemat(mat, {"annotations": annotations(rows)})
    return base


def csv_layout(root: Path, n_train: int = 6, n_test: int = 4, classes: int = 3,
               learnable: bool = False, scale: int = 1) -> Path:
    """An image folder with ``labels.csv`` (labels 1..classes, as the post's annots.csv)."""
    rows = []
    for split, n in (("train", n_train), ("test", n_test)):
        for fname, c, _ in _images(root / split, split, n, classes, learnable, scale):
            rows.append((f"{split}/{fname}", c, split))
    with open(root / "labels.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["filename", "label", "split"])
        out.writerows(rows)
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", type=Path)
    p.add_argument("--layout", choices=("devkit", "csv"), default="devkit")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--train", type=int, default=32)
    p.add_argument("--test", type=int, default=16)
    a = p.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    if a.layout == "devkit":
        devkit_layout(a.dir, a.train, a.test, [f"car {i + 1}" for i in range(a.classes)],
                      learnable=True, scale=2)
    else:
        csv_layout(a.dir, a.train, a.test, a.classes, learnable=True, scale=2)
    print(f"wrote a {a.layout} Stanford Cars sample of {a.classes} classes to {a.dir}")


if __name__ == "__main__":
    main()
