"""ResNet50 with fastai 0.7's head and layer groups: ImageNet weights from a file or
torchvision's cache (a one-line error without them), the head's shape and initialization,
and BatchNorms that keep their statistics while their layers are frozen."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from toolkit.errors import UserError
from toolkit.models import FreezableSequential, cached_weights, resnet50


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> tuple[Path, dict]:
    """A randomly initialized torchvision resnet50, saved as torchvision saves IMAGENET1K_V1
    (a plain state dict): the ``--weights PATH`` route, with no download."""
    import torchvision

    torch.manual_seed(0)
    state = torchvision.models.resnet50(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet50-random.pth"
    torch.save(state, path)
    return path, state


def test_resnet50_loads_the_weights_and_has_fastais_head(weights_file):
    path, state = weights_file
    torch.manual_seed(0)
    model, groups = resnet50(196, weights=path)
    assert torch.equal(model.layer3[2].conv2.weight, state["layer3.2.conv2.weight"])
    assert torch.equal(model.bn1.running_var, state["bn1.running_var"])
    def describe(m: nn.Module):
        size = {nn.BatchNorm1d: lambda: m.num_features, nn.Dropout: lambda: m.p,
                nn.Linear: lambda: (m.in_features, m.out_features)}.get(type(m), lambda: None)
        return type(m).__name__, size()

    assert [describe(m) for m in model.head] == [("BatchNorm1d", 4096), ("Dropout", 0.25), ("Linear", (4096, 512)),
                      ("ReLU", None), ("BatchNorm1d", 512), ("Dropout", 0.5),
                      ("Linear", (512, 196))]
    assert [type(m).__name__ for m in model.pool.children()] == ["AdaptiveMaxPool2d",
                                                                 "AdaptiveAvgPool2d"]
    assert torch.all(model.head[2].bias == 0) and torch.all(model.head[6].bias == 0)
    # kaiming_normal (fan_in, gain sqrt(2)): std sqrt(2 / 4096) for the first layer.
    assert math.isclose(model.head[2].weight.std().item(), math.sqrt(2 / 4096), rel_tol=0.02)
    model.eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        features = model[:10](x)  # body, pool, flatten
        assert features.shape == (2, 4096) and model(x).shape == (2, 196)
        body = nn.Sequential(*list(model.children())[:8])(x)
        torch.testing.assert_close(features, torch.cat([body.amax((2, 3)), body.mean((2, 3))], 1))


def test_layer_groups_are_fastais_split(weights_file):
    model, groups = resnet50(10, pretrained=False)
    names = {id(p): n for n, p in model.named_parameters()}
    parts = [[names[id(p)] for p in g.parameters()] for g in groups]
    assert len(parts) == 3 and sum(map(len, parts)) == len(names)
    assert len({n for part in parts for n in part}) == len(names)  # a partition
    # lr_cut = 6: conv1, bn1, relu, maxpool, layer1, layer2 | layer3, layer4 | the head.
    assert {n.split(".")[0] for n in parts[0]} == {"conv1", "bn1", "layer1", "layer2"}
    assert {n.split(".")[0] for n in parts[1]} == {"layer3", "layer4"}
    assert {n.split(".")[0] for n in parts[2]} == {"head"}


def test_weights_from_torchvisions_cache_or_a_one_line_error(weights_file, tmp_path, monkeypatch):
    path, state = weights_file
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    cache = cached_weights()
    assert cache == tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    with pytest.raises(UserError) as e:
        resnet50(196)
    assert "\n" not in str(e.value) and str(cache) in str(e.value) and "--weights" in str(e.value)
    with pytest.raises(UserError) as e:
        resnet50(196, weights=tmp_path / "nowhere.pth")
    assert "--weights" in str(e.value) and str(cache) in str(e.value)
    cache.parent.mkdir(parents=True)
    cache.symlink_to(path)
    model, _ = resnet50(196)
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a torch state dict") as e:
        resnet50(196, weights=broken)
    assert "\n" not in str(e.value)
    foreign = tmp_path / "foreign.pth"
    torch.save({"weight": torch.zeros(1)}, foreign)
    with pytest.raises(UserError, match="not torchvision's resnet50"):
        resnet50(196, weights=foreign)


def test_frozen_batchnorms_keep_their_statistics():
    torch.manual_seed(0)
    model, groups = resnet50(5, pretrained=False)
    assert isinstance(model, FreezableSequential)
    for g in groups[:2]:  # the post's first stage: the head alone
        for p in g.parameters():
            p.requires_grad_(False)
    body_bn, head_bn = model.layer2[0].bn1, model.head[0]
    before = body_bn.running_mean.clone(), head_bn.running_mean.clone()
    model.train()
    model(torch.randn(4, 3, 32, 32))
    assert torch.equal(body_bn.running_mean, before[0]) and not body_bn.training
    assert not torch.equal(head_bn.running_mean, before[1]) and head_bn.training
    for p in model.parameters():  # the second stage: everything
        p.requires_grad_(True)
    model(torch.randn(4, 3, 32, 32))
    assert not torch.equal(body_bn.running_mean, before[0]) and body_bn.training
