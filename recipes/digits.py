"""Digits: a small convnet trained with AdamW + 1cycle, the toolkit's smoke-test recipe.

scikit-learn ships the real UCI digits set (1,797 8x8 images), so this runs offline.
Target: >= 96% test accuracy. Measured 2026-11-26 on 2 shared CPU cores (torch 2.14.1):
99.4% after 15 epochs (330 steps) in 52-105 s of training, depending on the neighbours; on
a lent H200, 99.2% in 10 s with ``--optim.impl compiled --precision bf16``.

Test-time augmentation (``--preset tta``: trained on random crops of the image padded by one
pixel, then the post's TTA and the fixed shifts), measured 2026-12-01 on 2 CPU cores, seeds
0-4: 98.56% plain, **98.83%** with the post's TTA, 98.94% with the fixed shifts (means of 5;
the test set is 360 images, one image is 0.28 points). Without the crops in training the
post's TTA, which draws the training transform, loses 2-6 points.

    python recipes/digits.py
    accelerate launch recipes/digits.py
    accelerate launch --config_file launch/cpu-2proc.yaml recipes/digits.py
    torchrun --nproc_per_node 2 recipes/digits.py
    python recipes/digits.py --lr-find               # LR range test, writes lr_find.png
    python recipes/digits.py --preset adam-l2 --optim.amsgrad
    python recipes/digits.py --preset tta             # tta_accuracy in results.json
    python recipes/digits.py --freeze-epochs 3 --optim.lr 3e-3 --optim.lr-mults 0.111 0.333 1
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from toolkit import recipe
from toolkit.config import OptimConfig, ScheduleConfig, Train, TrainConfig, to_dict
from toolkit.data.cifar import PadCropFlip
from toolkit.data.source import DeviceTensors
from toolkit.errors import UserError
from toolkit.tta import accuracy_line, tta_evaluation
from toolkit.recipe import Run
from toolkit.stages import check_head_first, head_first
from toolkit.trainer import Trainer


@dataclass
class Config:
    train: Train = field(default_factory=lambda: TrainConfig(
        output_dir="runs/digits", epochs=15, batch_size=64, log_every=5))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adamw", lr=1e-2, wd=1e-2))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(div=10, pct=0.1))
    width: int = 32
    """Channels of the first conv layer (doubled after each)."""
    dropout: float = 0.1
    """Dropout before the classifier."""
    data_dir: str | None = None
    """Folder with digits.csv.gz (scikit-learn's format: 64 pixels and a label per row);
    default: the copy scikit-learn ships."""

    freeze_epochs: int = 0
    """First train only the head (the last layer group) for this many epochs at freeze_lr,
    then every layer for train.epochs at optim.lr (times optim.lr_mults over the three layer
    groups): two 1cycles, each with a fresh optimizer, as the post fine-tuned Stanford Cars."""
    freeze_lr: float = 1e-2
    """Max lr of the head-only stage."""
    shift: int = 0
    """Training augmentation: a random crop of the image padded by ``shift`` pixels (0: none)."""
    tta: bool = False
    """Test-time augmentation at the end: the image and 4 random crops of it padded by
    ``max(shift, 1)`` pixels (``tta_accuracy``), and the image with its 4 shifts by one pixel
    (``tta_fixed_accuracy``); no flips: a flipped digit is another digit."""

    def validate(self) -> None:
        check_head_first(self.freeze_epochs, self.freeze_lr)
        if self.width < 1:
            raise ValueError(f"--width={self.width} must be >= 1")
        if not 0 <= self.shift < 8:
            raise ValueError(f"--shift={self.shift} must be in [0, 8)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout={self.dropout} must be in [0, 1)")


PRESETS = {
    "default": Config,
    # The post's comparison: Adam with L2 regularization instead of decoupled decay.
    "adam-l2": lambda: dataclasses.replace(Config(), optim=OptimConfig(name="adam", lr=1e-2, wd=1e-4)),
    "sgd": lambda: dataclasses.replace(Config(), optim=OptimConfig(name="sgd", lr=0.1, wd=5e-4)),
    # Trained on 1-pixel random crops, evaluated with TTA: the post's TTA draws the training
    # transform, which a model trained without it has not seen (it then loses 2-6 points).
    "tta": lambda: dataclasses.replace(Config(), shift=1, tta=True),
}


def load_digits(data_dir: str | None, seed: int = 0, augment: PadCropFlip | None = None
                ) -> tuple[DeviceTensors, DeviceTensors]:
    """Stratified 80/20 split (seed 0): 1,437 training and 360 test images, scaled to [0, 1];
    ``augment`` the training batches' ``augment(x, draw)``."""
    from sklearn.datasets import load_digits as sk_load
    from sklearn.model_selection import train_test_split

    if data_dir is None:
        x, y = sk_load(return_X_y=True)
    else:
        path = Path(data_dir) / "digits.csv.gz"
        if not path.is_file():
            raise UserError(f"--data-dir {data_dir}: {path.name} not found there; omit "
                            "--data-dir to use the copy scikit-learn ships")
        table = np.loadtxt(path, delimiter=",")
        x, y = table[:, :-1], table[:, -1]
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    def as_set(a, b, **kw) -> DeviceTensors:
        return DeviceTensors(torch.tensor(a, dtype=torch.float32).view(-1, 1, 8, 8) / 16,
                             torch.tensor(b, dtype=torch.long), **kw)

    def train_augment(batch: tuple, draw) -> tuple:
        x, *rest = batch
        return (augment.crop_flip(x, draw), *rest)

    return (as_set(xtr, ytr, seed=seed, augment=train_augment if augment else None),
            as_set(xte, yte, shuffle=False))


def convnet(width: int, dropout: float) -> nn.Sequential:
    # No batch norm: its statistics would depend on the micro-batch split, and the
    # recipe is also the toolkit's check that N processes equal one.
    w = width
    return nn.Sequential(
        nn.Conv2d(1, w, 3, padding=1), nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * w, 10))


def build(cfg: Config) -> Run:
    # Pixels are already in [0, 1]: PadCropFlip's pad (reflected) and crop, no flip.
    def crops(pad: int) -> PadCropFlip:
        return PadCropFlip((0.0,), (1.0,), pad=pad, size=8, flip=False, pad_mode="reflect")

    train_set, test_set = load_digits(cfg.data_dir, cfg.train.seed,
                                      crops(cfg.shift) if cfg.shift else None)
    model = convnet(cfg.width, cfg.dropout)
    groups = [model[:5], model[5:8], model[8:]]  # two conv blocks, the last conv, the head
    stages = head_first(cfg.train.epochs, cfg.optim, cfg.schedule, head=len(groups) - 1,
                        freeze_epochs=cfg.freeze_epochs, freeze_lr=cfg.freeze_lr)
    trainer = Trainer(model, train_set, test_set, train=cfg.train, stages=stages,
                      layer_groups=groups, recipe_config=to_dict(cfg))

    tta = tta_evaluation(trainer, crops(max(cfg.shift, 1)).crop_flip, seed=cfg.train.seed,
                         shift=1, flip=False)
    return Run(trainer, final_evaluation=tta if cfg.tta else None,
               model=(convnet, {"width": cfg.width, "dropout": cfg.dropout}),
               summary=accuracy_line)


if __name__ == "__main__":
    recipe.main(PRESETS, build, __doc__)
