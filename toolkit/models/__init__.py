"""Image models of the post: WRN-22 for CIFAR-10, ResNet50 with fastai 0.7's head for
Stanford Cars (the language models are :mod:`toolkit.lm`'s)."""

from toolkit.models.resnet import (
    AdaptiveConcatPool2d,
    FreezableSequential,
    cached_weights,
    imagenet_state_dict,
    resnet50,
)
from toolkit.models.wrn import WideResNet, wrn_22

__all__ = ["AdaptiveConcatPool2d", "FreezableSequential", "cached_weights", "imagenet_state_dict",
           "resnet50", "WideResNet", "wrn_22"]
