"""WRN-22, the wide ResNet of the post's CIFAR-10 runs: fastai 0.7's ``wrn_22()``.

The post's ``train_cifar10.py`` imports ``wrn_22`` from ``fastai.models.cifar10.wideresnet``
(fastai's DAWNBench network), not the Cutout-derived ``fastai.models.wideresnet``; the two
differ. This is the former, layer for layer:

* a 3x3 stem conv, 3 -> 16 channels; then 3 groups of 3 :class:`BasicBlock` with
  ``16 * k * 2**i`` channels (96, 192, 384 for ``k=6``), the first block of groups 2 and 3
  with stride 2 (32x32 -> 16x16 -> 8x8);
* then BatchNorm, ReLU, global average pooling, flatten, a linear layer to 10 classes.

Convs have no bias; initialization is PyTorch's default (fastai's file sets none, and
``ConvLearner.from_model_data`` adds none; BatchNorm starts at weight 1, bias 0). The module
names follow fastai's (``features.{i}.bn``, ``.conv1``, ``.conv2.{0,2}``, ``.shortcut``), so
the state dict of one loads into the other. 9,658,458 parameters for ``wrn_22()``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

RESIDUAL_SCALE = 0.2
"""fastai's DAWNBench blocks multiply the residual branch by 0.2 before the add: at
initialization each block then changes its input little, which lets the network take the
large learning rates of 1cycle from the first steps."""


def conv(ni: int, nf: int, ks: int, stride: int) -> nn.Conv2d:
    """fastai's ``conv_2d``: same padding, no bias (a BatchNorm always follows or precedes)."""
    return nn.Conv2d(ni, nf, kernel_size=ks, stride=stride, padding=ks // 2, bias=False)


class BasicBlock(nn.Module):
    """A pre-activation block: ``h = relu(bn(x))``, then
    ``conv2(dropout(conv1(h))) * 0.2 + shortcut(h)`` with ``conv2`` = BN, ReLU, 3x3 conv.

    As in fastai, the shortcut starts from the activated ``h``, not from ``x``: a 1x1 conv
    (with the block's stride) where the width changes, else ``h`` itself.
    """

    def __init__(self, ni: int, nf: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn = nn.BatchNorm2d(ni)
        self.conv1 = conv(ni, nf, 3, stride)
        self.conv2 = nn.Sequential(nn.BatchNorm2d(nf), nn.ReLU(inplace=True), conv(nf, nf, 3, 1))
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.shortcut = conv(ni, nf, 1, stride) if ni != nf else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn(x))
        # Out of place, unlike fastai's `x.add_(r)`: the same numbers, and under bf16 autocast
        # the sum may promote rather than fail.
        return self.conv2(self.drop(self.conv1(h))) * RESIDUAL_SCALE + self.shortcut(h)


class WideResNet(nn.Module):
    """fastai 0.7's CIFAR-10 ``WideResNet(num_groups, N, num_classes, k, drop_p, start_nf)``,
    one ``features`` Sequential: stem, ``num_groups * blocks`` blocks, head.

    ``layer_groups()`` cuts it by group (the stem joins the first, the head the last), for
    discriminative learning rates or freezing; fastai 0.7 itself trained it as one group.
    Channels-last friendly (no ``view`` on activations) and bf16 friendly (no in-place add
    across dtypes).
    """

    def __init__(self, num_groups: int = 3, blocks: int = 3, num_classes: int = 10, k: int = 6,
                 dropout: float = 0.0, start_nf: int = 16):
        super().__init__()
        widths = [start_nf] + [start_nf * 2 ** i * k for i in range(num_groups)]
        layers: list[nn.Module] = [conv(3, widths[0], 3, 1)]
        for i in range(num_groups):
            for j in range(blocks):
                stride = (1 if i == 0 else 2) if j == 0 else 1
                layers.append(BasicBlock(widths[i] if j == 0 else widths[i + 1], widths[i + 1],
                                         stride, dropout))
        layers += [nn.BatchNorm2d(widths[-1]), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
                   nn.Flatten(), nn.Linear(widths[-1], num_classes)]
        self.features = nn.Sequential(*layers)
        self.num_groups, self.blocks = num_groups, blocks

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)

    def layer_groups(self) -> list[nn.Sequential]:
        """One part per group of blocks: ``[stem + group 1, group 2, ..., last group + head]``."""
        n, f = self.blocks, self.features
        ends = [1 + (i + 1) * n for i in range(self.num_groups)]
        starts = [0] + ends[:-1]
        ends[-1] = len(f)
        return [f[a:b] for a, b in zip(starts, ends)]


def wrn_22(num_classes: int = 10, dropout: float = 0.0) -> WideResNet:
    """WRN-22 with widen factor 6, no dropout: fastai 0.7's ``wrn_22()``, the post's model
    (``WideResNet(num_groups=3, N=3, num_classes=10, k=6, drop_p=0.)``); 9,658,458
    parameters."""
    return WideResNet(num_groups=3, blocks=3, num_classes=num_classes, k=6, dropout=dropout)
