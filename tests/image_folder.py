"""A small generated image data set in the layouts ``recipes/images.py`` reads: three classes
a network tells apart in a few epochs (horizontal stripes, vertical stripes, a checkerboard,
each in random colors: the pattern survives grayscale, flips and small rotations), images of
mixed sizes and modes (RGB and grayscale JPEG, RGBA and palette PNG, CMYK JPEG), and, on
request, one corrupt file.

    python tests/image_folder.py DIR    # DIR/train/<class>/*, DIR/valid/<class>/*
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("checks", "hstripes", "vstripes")
MODES = ("RGB", "L", "RGBA", "P", "CMYK")


def picture(kind: str, rng: np.random.Generator) -> np.ndarray:
    h, w = (int(v) for v in rng.integers(40, 90, 2))
    period = int(rng.integers(6, 12))
    ys, xs = np.mgrid[:h, :w]
    on = {"hstripes": ys // period % 2, "vstripes": xs // period % 2,
          "checks": (ys // period + xs // period) % 2}[kind].astype(bool)
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    while np.abs(a.astype(int) - b).sum() < 200:  # contrast enough to see in grayscale
        b = rng.integers(0, 256, 3)
    img = np.where(on[..., None], a, b) + rng.normal(0, 12, (h, w, 3))
    return img.clip(0, 255).astype(np.uint8)


def save(arr: np.ndarray, path: Path, mode: str) -> Path:
    im = Image.fromarray(arr)
    if mode == "P":
        im.convert("P", palette=Image.Palette.ADAPTIVE).save(path := path.with_suffix(".png"))
    elif mode == "RGBA":
        im = im.convert("RGBA")
        im.putalpha(200)
        im.save(path := path.with_suffix(".png"))
    else:
        im.convert(mode).save(path := path.with_suffix(".jpg"), quality=90)
    return path


def write(root: Path, per_class: dict[str, int] | None = None, seed: int = 0,
          corrupt: bool = False) -> dict[str, list[tuple[Path, str]]]:
    """``root/<split>/<class>/<n>.jpg|png``; returns each split's (file, class)."""
    per_class = per_class or {"train": 40, "valid": 12}
    rng, files = np.random.default_rng(seed), {}
    for split, n in per_class.items():
        files[split] = []
        for c in CLASSES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                path = save(picture(c, rng), root / split / c / f"{i:03d}", MODES[i % len(MODES)])
                files[split].append((path, c))
    if corrupt:
        bad = root / "train" / CLASSES[0] / "corrupt.jpg"
        bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        files["train"].append((bad, CLASSES[0]))
    return files


if __name__ == "__main__":
    write(Path(sys.argv[1]))


def write_datasets(root: Path, files: dict[str, list[tuple[Path, str]]]) -> Path:
    """The same images as a ``datasets`` DatasetDict written by ``save_to_disk`` (the image
    bytes embedded), splits train and validation."""
    import datasets

    features = datasets.Features({"img": datasets.Image(),
                                  "label": datasets.ClassLabel(names=list(CLASSES))})
    names = {"train": "train", "valid": "validation", "test": "test"}
    dd = datasets.DatasetDict({names[k]: datasets.Dataset.from_dict(
        {"img": [str(p) for p, _ in v], "label": [CLASSES.index(c) for _, c in v]},
        features=features) for k, v in files.items()})
    dd.save_to_disk(str(root))
    return root
