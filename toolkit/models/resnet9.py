"""ResNet-9 (Myrtle's DAWNBench CIFAR-10 network, the base of airbench): the small net of the
CIFAR-10 recipe's ``cpu`` preset, where WRN-22's 9.7M parameters take too long on 2 cores.

``width`` w gives channels (w, 2w, 4w, 8w); w = 64 is Myrtle's 6.5M-parameter net, w = 16
(16-32-64-128) the 0.4M one this project's baseline measured (87.3% in 7.4 minutes on 2 CPU
cores). The logits are scaled by 0.125, as Myrtle's.
"""

from __future__ import annotations

from torch import Tensor, nn


def conv_bn(ni: int, nf: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(ni, nf, 3, padding=1, bias=False), nn.BatchNorm2d(nf),
                         nn.ReLU(inplace=True))


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ResNet9(nn.Module):
    def __init__(self, width: int = 64, num_classes: int = 10, scale: float = 0.125):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn(3, w),
            conv_bn(w, 2 * w), nn.MaxPool2d(2), Residual(2 * w),
            conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),
            conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), Residual(8 * w),
            nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = nn.Linear(8 * w, num_classes, bias=False)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x)) * self.scale
