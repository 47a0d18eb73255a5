"""Image classification on your own images with the post's method: AdamW + 1cycle, the head
first, then every layer with discriminative lrs (the Stanford Cars recipe's schedule).

    python recipes/images.py --data-dir my_photos --weights resnet34-b627a593.pth
    python recipes/images.py --preset scratch --data-dir my_photos --arch resnet18
    accelerate launch recipes/images.py --data-dir hf:beans --arch resnet50 --lr-find

``--data-dir``: an image folder (``train/<class>/*`` with ``valid/<class>/*`` or
``--valid-pct``, optional ``test/``), a folder with ``labels.csv`` (``filename,label[,split]``),
a ``datasets`` folder written by ``save_to_disk``, or ``hf:NAME`` (``load_dataset`` from its
local cache) (:mod:`toolkit.data.images`). Every image is decoded once before training: an
unreadable one is a one-line error naming it, or skipped and counted with
``--skip-bad-images``.

``--arch``: any torchvision classification model; the ResNet family gets fastai's head and
layer groups (:func:`toolkit.models.resnet.torchvision_classifier`). ImageNet weights come
from ``--weights PATH`` or torchvision's cache (nothing downloads); ``--no-pretrained``
trains from a random initialization.

Presets: ``fine-tune`` (the default): the post's Cars schedule scaled from 20 + 40 epochs to
``--freeze-epochs`` 2 + ``--epochs`` 4: the head alone at 1e-2, then every layer at
3e-3 x (1/9, 1/3, 1), with the Cars augmentation and TTA. ``scratch``: one 1cycle of every
layer at the post's CIFAR-10 AdamW settings (lr 3e-3, wd 0.1), flips and crops only.

``model.json`` keeps the class names (``classes``) beside the architecture, so
``toolkit evaluate`` and :func:`toolkit.recipe.load_model` give a model and its labels.
``results.json`` holds ``valid_accuracy`` and, with ``--tta``, the TTA accuracies, and
``test_accuracy`` when there is a test split.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from toolkit import recipe
from toolkit.config import OptimConfig, ScheduleConfig, Train, TrainConfig, to_dict
from toolkit.data.cars import SIZE, SideOn
from toolkit.data.images import check_image_flags, check_images, image_loaders, read_images
from toolkit.models.resnet import torchvision_classifier
from toolkit.recipe import Run
from toolkit.stages import check_head_first, head_first
from toolkit.trainer import Trainer
from toolkit.tta import accuracy_line, tta_evaluation

AUGMENTS = {"side-on": SideOn(), "flip-crop": SideOn(p_rotate=0, brightness=0, contrast=0),
            "none": None}


@dataclass
class Config:
    train: Train = field(default_factory=lambda: TrainConfig(
        output_dir="runs/images", epochs=4, batch_size=64, log_every=10))
    """``epochs``: the stage of every layer (after ``freeze_epochs`` of the head alone)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        name="adamw", lr=3e-3, betas=(0.95, 0.99), wd=0.1, lr_mults=(1 / 9, 1 / 3, 1.0)))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(
        div=10, pct=0.1, moms=(0.95, 0.85), lin_end=True))
    data_dir: str | None = None
    """Image folder, folder with labels.csv, datasets save_to_disk folder, or hf:NAME."""
    valid_pct: float = 0.2
    """Share of the training images held out for validation when there is no valid split."""
    image_column: str | None = None
    """datasets: the image column (default: the Image feature)."""
    label_column: str | None = None
    """datasets: the label column (default: the ClassLabel feature, or 'label')."""
    skip_bad_images: bool = False
    """Leave unreadable images out (counted) instead of stopping at the first."""
    arch: str = "resnet34"
    """A torchvision classification model (resnet18 ... resnet152, efficientnet_b0, ...)."""
    weights: str | None = None
    """The architecture's ImageNet state dict; default: torchvision's cache."""
    pretrained: bool = True
    """Start from ImageNet weights (else a random initialization)."""
    freeze_epochs: int = 2
    """First stage: the head alone for this many epochs at ``freeze_lr`` (0: none)."""
    freeze_lr: float = 1e-2
    """Max lr of the head-only stage."""
    size: int = SIZE
    """Image size (square) for training and evaluation."""
    augment: Literal["side-on", "flip-crop", "none"] = "side-on"
    """side-on: the Cars recipe's (scale, rotate, lighting, flip, crop); flip-crop: scale,
    flip and crop only; none."""
    tta: bool = True
    """Test-time augmentation at the end (needs --augment other than none)."""
    workers: int = 4
    """DataLoader worker processes decoding the images, per rank."""
    channels_last: bool = False
    """Model in channels-last memory format (faster convolutions on GPUs)."""

    def validate(self) -> None:
        if self.data_dir is None:
            raise ValueError("--data-dir is required: an image folder, a folder with "
                             "labels.csv, a datasets save_to_disk folder or hf:NAME")
        check_head_first(self.freeze_epochs, self.freeze_lr)
        check_image_flags(self.size, self.workers, self.weights, self.pretrained)
        if self.tta and self.augment == "none":
            raise ValueError("--tta needs an --augment (side-on or flip-crop)")


def scratch() -> Config:
    cfg = Config()
    return dataclasses.replace(
        cfg, pretrained=False, freeze_epochs=0, augment="flip-crop",
        train=dataclasses.replace(cfg.train, epochs=30),
        optim=dataclasses.replace(cfg.optim, lr_mults=None))


PRESETS = {"fine-tune": Config, "scratch": scratch}


def build_model(arch: str, num_classes: int, classes: list[str] | None = None) -> nn.Module:
    """The architecture alone (the trained weights replace every value); ``classes`` rides
    along in ``model.json``."""
    return torchvision_classifier(arch, num_classes, pretrained=False)[0]


def build(cfg: Config) -> Run:
    splits, classes = read_images(cfg.data_dir, valid_pct=cfg.valid_pct, seed=cfg.train.seed,
                                  image_column=cfg.image_column, label_column=cfg.label_column)
    skipped = check_images(splits, cfg.skip_bad_images, max(cfg.workers, 1))
    loaders = image_loaders(splits, size=cfg.size, augment=AUGMENTS[cfg.augment],
                            seed=cfg.train.seed, num_workers=cfg.workers,
                            pin_memory=torch.cuda.is_available())
    model, groups = torchvision_classifier(cfg.arch, len(classes), cfg.weights,
                                           pretrained=cfg.pretrained)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    stages = head_first(cfg.train.epochs, cfg.optim, cfg.schedule, head=len(groups) - 1,
                        freeze_epochs=cfg.freeze_epochs, freeze_lr=cfg.freeze_lr)
    trainer = Trainer(model, loaders["train"], loaders["valid"], train=cfg.train, stages=stages,
                      layer_groups=groups, recipe_config=to_dict(cfg))
    trainer.print(f"{cfg.arch}, {len(classes)} classes; images: " + ", ".join(
        f"{k} {len(s.samples)}" for k, s in splits.items())
        + (f"; skipped {len(skipped)} unreadable, the first {skipped[0]}" if skipped else ""))

    def final() -> dict:
        out = tta_evaluation(trainer, AUGMENTS[cfg.augment], seed=cfg.train.seed,
                             shift=cfg.size // 28)() if cfg.tta else {}
        if "test" in loaders:
            out.update(test_scores(trainer, loaders["test"]))
        return out

    return Run(trainer, final_evaluation=final,
               model=(build_model, {"arch": cfg.arch, "num_classes": len(classes),
                                    "classes": classes}),
               summary=summary)


def summary(results: dict) -> str:
    line = accuracy_line(results, "valid")
    return line + (f"; test accuracy {results['test_accuracy']:.4f}"
                   if "test_accuracy" in results else "")


def test_scores(trainer: Trainer, test) -> dict:
    """Accuracy and loss on the test split, through the trainer's validation pass."""
    acc = trainer.accelerator
    view = test.shard(batch_size=trainer.train_cfg.batch_size, world=acc.num_processes,
                      rank=acc.process_index, accum=1, device=acc.device)
    valid, trainer.eval_data = trainer.eval_data, view
    try:
        scores = trainer.evaluate()
    finally:
        trainer.eval_data = valid
    return {f"test_{k.removeprefix('valid_')}": v for k, v in scores.items()}


if __name__ == "__main__":
    recipe.main(PRESETS, build, __doc__)
