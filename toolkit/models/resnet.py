"""ResNet50 with fastai 0.7's ``ConvLearner`` head and layer groups, the post's Stanford Cars
model, with torchvision's ImageNet weights read from a local file (nothing downloads).

fastai 0.7 (``old/fastai/conv_learner.py``, ``ConvnetBuilder``) kept torchvision's
``resnet50(pretrained=True)`` up to ``layer4`` (``model_meta[resnet50] = [8, 6]``:
``cut_model(m, 8)``), added ``AdaptiveConcatPool2d()`` (max and average pooling
concatenated, 2 x 2048 = 4096 features) and ``Flatten()``, then with its defaults
``xtra_fc=[512]``, ``ps=[0.25, 0.5]`` the head ``BatchNorm1d(4096), Dropout(0.25),
Linear(4096, 512), ReLU, BatchNorm1d(512), Dropout(0.5), Linear(512, c), LogSoftmax``,
initialized with ``kaiming_normal`` (biases 0, BatchNorm left alone). The final
``LogSoftmax`` is left out: the trainer's cross-entropy on logits is fastai's ``nll_loss``
on log-probabilities, and softmax(logits) is exp(log_softmax).

Its layer groups (``get_layer_groups``: ``split_by_idxs(children, [lr_cut=6])`` + the head)
are the body's first six children (conv1, bn1, relu, maxpool, layer1, layer2), the rest
(layer3, layer4, the pooling) and the head: the post's discriminative lrs (lr/9, lr/3, lr)
and its head-only first stage use these three.

fastai's ``set_train_mode`` also keeps every BatchNorm whose layer is frozen in eval mode
while training (``not trainable: m.eval()``), so the head-only stage does not move the
body's ImageNet statistics; :class:`FreezableSequential` does the same.

The weights are torchvision's ``ResNet50_Weights.IMAGENET1K_V1`` (the 2017 weights fastai 0.7
loaded through ``resnet50(pretrained=True)``), read from torchvision's cache
(``torch.hub.get_dir()/checkpoints/resnet50-0676ba61.pth``) or from ``--weights PATH``.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from toolkit.errors import UserError

WEIGHTS_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"
"""torchvision's ``ResNet50_Weights.IMAGENET1K_V1``."""
BODY = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
LR_CUT = 6
"""fastai 0.7's ``model_meta[resnet50][1]``: the first layer group is ``BODY[:6]``."""


def cached_weights(url: str = WEIGHTS_URL) -> Path:
    """Where torchvision keeps the weights file of ``url`` once downloaded."""
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]


def imagenet_state_dict(weights: str | Path | None = None, url: str = WEIGHTS_URL,
                        arch: str = "resnet50") -> dict[str, torch.Tensor]:
    """torchvision's ``arch`` ImageNet state dict (the file of ``url``) from ``weights`` or,
    without it, from torchvision's cache; a one-line :class:`UserError` naming both when
    neither is there."""
    path = Path(weights) if weights is not None else cached_weights(url)
    if not path.is_file():
        where = f"--weights {path} is not a file" if weights is not None else \
            f"{path} (torchvision's cache) is missing"
        raise UserError(f"no ImageNet weights for {arch}: {where}; copy {url} to "
                        f"{cached_weights(url)} or pass --weights PATH (nothing downloads here)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, in one line
        raise UserError(f"--weights {path} is not a torch state dict: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(state, dict):
        raise UserError(f"--weights {path} holds a {type(state).__name__}, not a state dict")
    return state


def load_weights(net: nn.Module, arch: str, weights: str | Path | None, url: str) -> None:
    """torchvision's ImageNet weights of ``arch`` into ``net`` (:func:`imagenet_state_dict`);
    a file of another architecture is one line."""
    path = weights if weights is not None else cached_weights(url)
    result = net.load_state_dict(imagenet_state_dict(weights, url, arch), strict=False)
    if result.missing_keys or result.unexpected_keys:
        keys = result.missing_keys or result.unexpected_keys
        raise UserError(f"--weights {path} is not torchvision's {arch}: "
                        f"{len(result.missing_keys)} missing and "
                        f"{len(result.unexpected_keys)} unexpected keys, e.g. {keys[0]}")


class AdaptiveConcatPool2d(nn.Module):
    """fastai's: adaptive max and average pooling concatenated (max first)."""

    def __init__(self, size: int = 1):
        super().__init__()
        self.mp, self.ap = nn.AdaptiveMaxPool2d(size), nn.AdaptiveAvgPool2d(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.mp(x), self.ap(x)], 1)


class FreezableSequential(nn.Sequential):
    """A ``Sequential`` whose BatchNorm layers run in eval mode while the model trains when
    their parameters are frozen (fastai 0.7's ``set_train_mode``): when none of them
    requires a gradient, or when a trainer stage marked the layer ``frozen`` (under
    DeepSpeed, which steps frozen groups at lr 0 instead). Decided at each training forward,
    so it follows a stage's changes whenever they happen, and finds BatchNorms that
    ``--sync-batchnorm`` replaced."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    params = list(m.parameters(recurse=False))
                    if params:
                        m.training = not getattr(m, "frozen", False) and any(
                            p.requires_grad for p in params)
        return super().forward(x)


def head(num_features: int, num_classes: int, xtra_fc: tuple[int, ...] = (512,),
         ps: tuple[float, ...] | None = None) -> nn.Sequential:
    """fastai 0.7's ``ConvnetBuilder.get_fc_layers`` without the final LogSoftmax: per hidden
    size ``BatchNorm1d, Dropout, Linear, ReLU``, then ``BatchNorm1d, Dropout, Linear``;
    ``ps`` defaults to 0.25 per hidden layer and 0.5 for the last."""
    ps = tuple(ps) if ps is not None else (0.25,) * len(xtra_fc) + (0.5,)
    if len(ps) != len(xtra_fc) + 1:
        raise ValueError(f"ps={ps} needs one dropout per layer: {len(xtra_fc) + 1}")
    layers, ni = [], num_features
    for i, nf in enumerate((*xtra_fc, num_classes)):
        layers.append(nn.BatchNorm1d(ni))
        if ps[i]:
            layers.append(nn.Dropout(ps[i]))
        layers.append(nn.Linear(ni, nf))
        if i < len(xtra_fc):
            layers.append(nn.ReLU())
        ni = nf
    fc = nn.Sequential(*layers)
    for m in fc.modules():  # fastai's apply_init(fc_model, kaiming_normal)
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)
    return fc


def resnet50(num_classes: int, weights: str | Path | None = None, *, pretrained: bool = True,
             xtra_fc: tuple[int, ...] = (512,), ps: tuple[float, ...] | None = None
             ) -> tuple[FreezableSequential, list[nn.Module]]:
    """The post's model for ``num_classes`` (196 for Cars) and its three layer groups (body
    to layer2, layer3-layer4, head). ``pretrained``: torchvision's ImageNet weights from
    ``weights`` or its cache (:func:`imagenet_state_dict`); else random initialization.
    Build it after seeding: the head's initialization draws from the global RNG."""
    import torchvision

    net = torchvision.models.resnet50(weights=None)
    if pretrained:
        load_weights(net, "resnet50", weights, WEIGHTS_URL)
    return _fastai_resnet(net, num_classes, xtra_fc, ps)


def _fastai_resnet(net, num_classes: int, xtra_fc: tuple[int, ...] = (512,),
                   ps: tuple[float, ...] | None = None
                   ) -> tuple[FreezableSequential, list[nn.Module]]:
    body = [(name, getattr(net, name)) for name in BODY]
    model = FreezableSequential(OrderedDict([
        *body, ("pool", AdaptiveConcatPool2d()), ("flatten", nn.Flatten()),
        ("head", head(2 * net.fc.in_features, num_classes, xtra_fc, ps))]))
    groups = [nn.ModuleList(m for _, m in body[:LR_CUT]),
              nn.ModuleList([*(m for _, m in body[LR_CUT:]), model.pool]),
              model.head]
    return model, groups


def torchvision_classifier(arch: str, num_classes: int, weights: str | Path | None = None, *,
                           pretrained: bool = True) -> tuple[nn.Module, list[nn.Module]]:
    """Any torchvision classification model by name, for ``num_classes``, with three layer
    groups for the post's discriminative lrs and head-first stage. The ResNet family
    (resnet18 ... resnet152, resnext, wide_resnet) gets fastai's body and head and groups
    (:func:`resnet50`'s); any other model keeps its own head with its last ``Linear`` made
    anew for ``num_classes``, and its body cut in two halves of its parameterized layers.
    ``pretrained``: torchvision's default ImageNet weights for ``arch`` from ``weights`` or
    torchvision's cache (nothing downloads); else a random initialization."""
    import torchvision

    try:
        net = torchvision.models.get_model(arch, weights=None)
        url = torchvision.models.get_model_weights(arch).DEFAULT.url
    except ValueError:
        names = torchvision.models.list_models(torchvision.models)
        raise UserError(f"--arch {arch} is not a torchvision classification model "
                        f"(e.g. {', '.join(n for n in names if n.startswith('resnet'))})"
                        ) from None
    if pretrained:
        load_weights(net, arch, weights, url)
    if all(hasattr(net, n) for n in (*BODY, "fc")):
        return _fastai_resnet(net, num_classes)
    parent, name, last = next((mod, n, c) for mod in reversed(list(net.modules()))
                              for n, c in reversed(list(mod.named_children()))
                              if isinstance(c, nn.Linear))
    setattr(parent, name, nn.Linear(last.in_features, num_classes))
    head = getattr(parent, name)
    layers = [m for m in net.modules() if m is not head and list(m.parameters(recurse=False))]
    half = len(layers) // 2
    return FreezableSequential(net), [nn.ModuleList(layers[:half]), nn.ModuleList(layers[half:]),
                                      head]
