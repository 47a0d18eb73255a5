"""CIFAR-10: Wide-ResNet-22 with AdamW + 1cycle, the post's image result (Gugger & Howard 2018).

The post's code is sgugger/Adam-experiments ``train_cifar10.py`` on fastai 0.7:
``train_cifar10.py 3e-3 --wd=0.1 --wd_loss=False``: fastai's ``wrn_22()``, decoupled weight
decay 0.1, lr 3e-3, batch 128, betas (0.95, 0.99) with beta1 cycled 0.95 -> 0.85 -> 0.95,
div 10 and a 3-phase cycle of 30 epochs with pct 0.075 (13.875 up, 13.875 down, 2.25 from
lr/10 to lr/1000, linear), pad 4 (cv2's reflection) + random 32x32 crop + flip. The post:
94.25% on average (``paper-30ep``), and 94% in 18 epochs with test-time augmentation
(``paper-18ep-tta``: ``--cyc_len=18 --tta=True``). Its appendix grid (mean of 5 runs, 30
epochs): AdamW 94.34% / with AMSGrad 93.69% (``--optim.amsgrad``), Adam-L2 93.94% / 93.36%
(``--optim.name adam`` with its L2 ``--optim.wd``, which the repository does not give).
Not run here yet: it needs a GPU.

``cpu`` trains Myrtle's ResNet-9 at width 16 (16-32-64-128) on the real data on 2 CPU cores,
13 epochs, with Muon at 2e-2 on the conv filters (AdamW on the rest; ``docs/contenders.md``
found it the fastest), label smoothing 0.2, bf16 autocast and channels-last images: measured
2026-12-07 in a fresh clone on 2 idle AMD EPYC cores (torch 2.14.1), **90.22%** test accuracy,
91.40% with TTA, in **6 min 57 s** from start to exit (seed 1: 90.52%, 91.47%). bf16 with
channels-last makes the step 2.8x fp32's on a CPU with bf16 instructions (``python
bench/compile.py --models resnet9 --settings fp32 bf16-channels-last``, which shows it for
another CPU; where bf16 loses, ``--precision fp32``). The same preset in fp32 at 11
epochs: 90.39% in 14 min 12 s. ``cpu-adamw``, the preset before (AdamW at 4e-3, fp32, 11
epochs; ZeRO- and FSDP2-ready: they refuse Muon): 88.27%, 89.24% with TTA, in 9 min 11 s on
2026-12-01 (the baseline it had to beat: 87.3% in 7.4 minutes).

The whole data set lives on the device as uint8 tensors; the augmentation is batched tensor
ops there, drawn from (seed, step, position in the global batch), so a resumed run and N
processes train on exactly what one uninterrupted process trains on.

    python recipes/cifar10.py --preset cpu --data-dir ../shared/data/cifar-10-batches-bin
    accelerate launch recipes/cifar10.py --preset paper-18ep-tta --data-dir data/cifar10
    torchrun --nproc_per_node 2 recipes/cifar10.py --preset cpu-adamw --strategy zero2 \\
        --data-dir ../shared/data/cifar-10-batches-bin

``results.json`` holds ``valid_accuracy`` and, with ``--tta``, ``plain_accuracy``,
``tta_accuracy`` (fastai's ``learn.TTA()``: the image and 4 augmented copies) and
``tta_fixed_accuracy`` (the image, its flip and 4 shifts).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from toolkit import recipe
from toolkit.config import OptimConfig, ScheduleConfig, Train, TrainConfig, to_dict
from toolkit.data.cifar import device_data, hold_out, load_cifar10
from toolkit.tta import accuracy_line, tta_evaluation
from toolkit.models.resnet9 import ResNet9
from toolkit.models.wrn import wrn_22
from toolkit.recipe import Run
from toolkit.trainer import Trainer


@dataclass
class Config:
    train: Train = field(default_factory=lambda: TrainConfig(
        output_dir="runs/cifar10", epochs=30, batch_size=128, log_every=50))
    # The post's AdamW: decoupled wd 0.1, beta2 0.99; every weight decays (fastai 0.7).
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        name="adamw", lr=3e-3, betas=(0.95, 0.99), wd=0.1, no_decay_bias_norm=False))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(
        div=10, pct=0.075, moms=(0.95, 0.85), lin_end=True))
    model: Literal["wrn22", "resnet9"] = "wrn22"
    """wrn22: fastai 0.7's wrn_22() (the post's); resnet9: Myrtle's ResNet-9 (cpu preset)."""
    width: int = 64
    """ResNet-9's first width (channels width, 2x, 4x, 8x)."""
    tta: bool = False
    """Test-time augmentation at the end (results: plain, tta and tta_fixed accuracies)."""
    channels_last: bool = False
    """Images and model in channels-last memory format (faster convolutions on GPUs)."""
    label_smoothing: float = 0.0
    """Label smoothing of the training loss (the CIFAR-10 speed runs' 0.2)."""
    holdout: int = 0
    """Evaluate on this many training images (a fixed draw, not trained on) instead of the
    test set: a validation split to tune on (5000 = 10%)."""
    data_dir: str | None = None
    """CIFAR-10 folder: cifar-10-batches-bin (.bin or .bin.gz) or cifar-10-batches-py;
    default: Hugging Face uoft-cs/cifar10."""

    def validate(self) -> None:
        if self.width < 1:
            raise ValueError(f"--width={self.width} must be >= 1")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"--label-smoothing={self.label_smoothing} must be in [0, 1)")


def paper_18ep_tta() -> Config:
    cfg = Config()
    return dataclasses.replace(cfg, tta=True, train=dataclasses.replace(cfg.train, epochs=18))


def cpu_adamw() -> Config:
    # 2 CPU cores: a 0.4M-parameter ResNet-9 at batch 256 (the measured baseline's set-up),
    # AdamW at 4e-3: 88.27% in 9 min 11 s (docs/reproducing.md); the preset for ZeRO and
    # FSDP2, which refuse Muon.
    cfg = Config()
    return dataclasses.replace(
        cfg, model="resnet9", width=16, tta=True,
        train=dataclasses.replace(cfg.train, output_dir="runs/cifar10-cpu", epochs=11,
                                  batch_size=256, log_every=20, eval_every=1000),
        optim=dataclasses.replace(cfg.optim, lr=4e-3, wd=0.1))


def cpu() -> Config:
    # cpu_adamw with Muon at 2e-2 on the conv filters (docs/contenders.md: the fastest), label
    # smoothing 0.2 (airbench's), bf16 autocast and channels-last (2.8x the fp32 step on
    # CPUs with bf16 instructions, bench/compile.py), which pay for 13 epochs instead of 11.
    cfg = cpu_adamw()
    return dataclasses.replace(
        cfg, label_smoothing=0.2, channels_last=True,
        train=dataclasses.replace(cfg.train, epochs=13, precision="bf16"),
        optim=dataclasses.replace(cfg.optim, name="muon", lr=2e-2))


PRESETS = {"paper-30ep": Config, "paper-18ep-tta": paper_18ep_tta, "cpu": cpu,
           "cpu-adamw": cpu_adamw}


def build_model(name: str, width: int) -> nn.Module:
    return wrn_22() if name == "wrn22" else ResNet9(width)


def build(cfg: Config) -> Run:
    data = load_cifar10(cfg.data_dir)  # a missing folder is a one-line UserError
    if cfg.holdout:
        data = hold_out(data, cfg.holdout)
    train_set, test_set = device_data(data, seed=cfg.train.seed,
                                      channels_last=cfg.channels_last)
    model = build_model(cfg.model, cfg.width)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    trainer = Trainer(model, train_set, test_set, train=cfg.train, optim=cfg.optim,
                      schedule=cfg.schedule, recipe_config=to_dict(cfg),
                      label_smoothing=cfg.label_smoothing)
    augment = train_set.augment

    tta = tta_evaluation(trainer, augment.crop_flip, seed=cfg.train.seed, shift=4)
    return Run(trainer, final_evaluation=tta if cfg.tta else None,
               model=(build_model, {"name": cfg.model, "width": cfg.width}),
               summary=lambda res: accuracy_line(res, "holdout" if cfg.holdout else "test"))


if __name__ == "__main__":
    recipe.main(PRESETS, build, __doc__)
