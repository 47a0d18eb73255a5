"""Stanford Cars: ImageNet ResNet50 fine-tuned in two 1cycles, the post's transfer result.

The post's code is sgugger/Adam-experiments ``fit_stanford_cars.py`` on fastai 0.7:
``fit_stanford_cars.py '(1e-2,3e-3)' --wd=1e-3 --tta=True``: torchvision's ResNet50 with
ImageNet weights and fastai's head (:mod:`toolkit.models.resnet`), 224 px with fastai's
side-on augmentation (:mod:`toolkit.data.cars`), batch 128, Adam with L2 weight decay 1e-3,
betas (0.95, 0.99) with beta1 cycled 0.95 -> 0.85 -> 0.95, div 10, pct 0.1, linear end;
first 20 epochs of the head alone at 1e-2 (the body frozen, its BatchNorms in eval mode),
then 40 epochs of every layer at 3e-3 x (1/9, 1/3, 1) over the three layer groups, each
stage with a fresh optimizer. The post: 90% in 60 epochs, 91% with test-time augmentation
(``paper``); its grid: Adam 89.6% / 91% TTA, with AMSGrad 89.9% / 91%
(``--optim.amsgrad``), AdamW 89.2% / 90.5%, with AMSGrad 89.9% / 90.5%
(``--optim.name adamw`` with its decoupled ``--optim.wd``, which the repository does not
give). Not run here: no copy of Stanford Cars and no GPU.

``cpu`` is a smoke run on small generated data in the real layouts (``python
tests/cars_sample.py DIR`` writes one): 64 px, batch 16, 1 + 2 epochs, from random weights.

    python recipes/cars.py --data-dir data/cars --weights resnet50-0676ba61.pth
    accelerate launch recipes/cars.py --data-dir data/cars
    torchrun --nproc_per_node 2 recipes/cars.py --preset cpu --data-dir /tmp/cars --strategy zero2

``--data-dir`` takes torchvision's ``StanfordCars`` layout or an image folder with
``labels.csv`` (:func:`toolkit.data.cars.read_cars`). The ImageNet weights come from
torchvision's cache or ``--weights PATH``; nothing downloads. ``results.json`` holds
``valid_accuracy`` and, with ``--tta``, ``plain_accuracy``, ``tta_accuracy`` (fastai's
``learn.TTA()``: the image and 4 copies with the training transforms) and
``tta_fixed_accuracy`` (the image, its flip and 4 shifts). Under DeepSpeed the frozen body
of the first stage is stepped at lr 0 rather than skipped: the same weights, a full
backward pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from toolkit import recipe
from toolkit.config import OptimConfig, ScheduleConfig, Train, TrainConfig, to_dict
from toolkit.data.cars import SIZE, SideOn, cars_data
from toolkit.data.images import check_image_flags
from toolkit.tta import accuracy_line, tta_evaluation
from toolkit.models.resnet import resnet50
from toolkit.recipe import Run
from toolkit.stages import check_head_first, head_first
from toolkit.trainer import Trainer


@dataclass
class Config:
    train: Train = field(default_factory=lambda: TrainConfig(
        output_dir="runs/cars", epochs=40, batch_size=128, log_every=10))
    """``epochs``: the second stage's (every layer)."""
    # The post's Adam with L2 1e-3 on every weight (fastai 0.7), discriminative lrs.
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        name="adam", lr=3e-3, betas=(0.95, 0.99), wd=1e-3, no_decay_bias_norm=False,
        lr_mults=(1 / 9, 1 / 3, 1.0)))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(
        div=10, pct=0.1, moms=(0.95, 0.85), lin_end=True))
    freeze_epochs: int = 20
    """First stage: the head alone, for this many epochs at ``freeze_lr`` (0: none)."""
    freeze_lr: float = 1e-2
    """Max lr of the head-only stage."""
    data_dir: str | None = None
    """Stanford Cars: torchvision's StanfordCars layout or an image folder with labels.csv."""
    weights: str | None = None
    """torchvision's resnet50 IMAGENET1K_V1 state dict; default: torchvision's cache."""
    pretrained: bool = True
    """Start from the ImageNet weights (else a random initialization)."""
    size: int = SIZE
    """Image size (the post: 224)."""
    workers: int = 4
    """DataLoader worker processes decoding and augmenting the JPEGs, per rank."""
    tta: bool = True
    """Test-time augmentation at the end (the post's ``--tta=True``)."""
    crop_to_box: bool = False
    """Crop each image to its devkit bounding box first (the post did not)."""
    channels_last: bool = False
    """Model in channels-last memory format (faster convolutions on GPUs)."""

    def validate(self) -> None:
        if self.data_dir is None:
            raise ValueError("--data-dir is required: a Stanford Cars folder (torchvision's "
                             "StanfordCars layout or images with labels.csv)")
        check_head_first(self.freeze_epochs, self.freeze_lr)
        check_image_flags(self.size, self.workers, self.weights, self.pretrained)


def cpu() -> Config:
    cfg = Config()
    return dataclasses.replace(
        cfg, freeze_epochs=1, size=64, workers=2, pretrained=False,
        train=dataclasses.replace(cfg.train, output_dir="runs/cars-cpu", epochs=2,
                                  batch_size=16, log_every=2))


PRESETS = {"paper": Config, "cpu": cpu}


def build_model(num_classes: int) -> nn.Module:
    """The architecture alone (the trained weights replace every value)."""
    return resnet50(num_classes, pretrained=False)[0]


def build(cfg: Config) -> Run:
    train_set, test_set, classes = cars_data(cfg.data_dir, size=cfg.size, seed=cfg.train.seed,
                                             num_workers=cfg.workers,
                                             crop_to_box=cfg.crop_to_box,
                                             pin_memory=torch.cuda.is_available())
    model, groups = resnet50(len(classes), cfg.weights, pretrained=cfg.pretrained)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    stages = head_first(cfg.train.epochs, cfg.optim, cfg.schedule, head=len(groups) - 1,
                        freeze_epochs=cfg.freeze_epochs, freeze_lr=cfg.freeze_lr)
    trainer = Trainer(model, train_set, test_set, train=cfg.train, stages=stages,
                      layer_groups=groups, recipe_config=to_dict(cfg))

    tta = tta_evaluation(trainer, SideOn(), seed=cfg.train.seed, shift=cfg.size // 28)
    return Run(trainer, final_evaluation=tta if cfg.tta else None,
               model=(build_model, {"num_classes": len(classes)}),
               summary=accuracy_line)


if __name__ == "__main__":
    recipe.main(PRESETS, build, __doc__)
