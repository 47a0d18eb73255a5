"""Stanford Cars and its ResNet50: both layouts built here in the real formats (devkit
``.mat`` files through ``scipy.io.savemat``, read back by torchvision's own
``StanfordCars``), fastai 0.7's side-on transforms against their definitions, augmentation
that is a function of (seed, epoch, index) whatever the workers and after a resume, and the
model's head, layer groups, weight files and frozen BatchNorms."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
import torch
from PIL import Image
from torch import nn

from toolkit.data.cars import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CarsImages,
    EpochLoader,
    SideOn,
    _warp,
    cars_data,
    decode,
    eval_image,
    read_cars,
)
from toolkit.errors import UserError
from toolkit.eval.tta import ExampleDraw
from toolkit.models import FreezableSequential, cached_weights, resnet50

CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Aston Martin V8 Vantage 2012"]
SIZES = [(40, 56), (64, 48), (36, 36), (50, 70), (45, 60), (60, 44)]  # (height, width)


def write_image(path: Path, h: int, w: int, seed: int, gray: bool = False) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (h, w) if gray else (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)


def annotations(rows: list[tuple[str, int, tuple[int, ...]]], labels: bool = True) -> np.ndarray:
    """The devkit's struct array: 1 x N, fields bbox_x1..bbox_y2, class (1-based), fname,
    each a MATLAB matrix (uint16 boxes, uint8 class, a char array name), as in the files."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", *(["class"] if labels else []), "fname"]
    arr = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for j, (fname, cls, box) in enumerate(rows):
        for f, v in zip(fields[:4], box):
            arr[f][0, j] = np.array([[v]], dtype=np.uint16)
        if labels:
            arr["class"][0, j] = np.array([[cls]], dtype=np.uint8)
        arr["fname"][0, j] = np.array([fname])
    return arr


def devkit_layout(root: Path, n_train: int = 6, n_test: int = 4) -> Path:
    """torchvision's StanfordCars layout under ``root/stanford_cars``."""
    base = root / "stanford_cars"
    for d in ("devkit", "cars_train", "cars_test"):
        (base / d).mkdir(parents=True)
    names = np.empty((1, len(CLASSES)), dtype=object)
    for i, c in enumerate(CLASSES):
        names[0, i] = np.array([c])
    sio.savemat(base / "devkit" / "cars_meta.mat", {"class_names": names})
    for split, n, mat in (("train", n_train, base / "devkit" / "cars_train_annos.mat"),
                          ("test", n_test, base / "cars_test_annos_withlabels.mat")):
        rows = []
        for j in range(n):
            h, w = SIZES[j % len(SIZES)]
            fname = f"{j + 1:05d}.jpg"
            write_image(base / f"cars_{split}" / fname, h, w, seed=100 * (split == "test") + j,
                        gray=j == 1)
            rows.append((fname, 1 + (j % len(CLASSES)), (2, 3, w - 1, h - 2)))
        sio.savemat(mat, {"annotations": annotations(rows)})
    return base


@pytest.fixture
def devkit(tmp_path: Path) -> Path:
    devkit_layout(tmp_path)
    return tmp_path


# ---- the two layouts -------------------------------------------------------------------
def test_devkit_layout_reads_what_torchvision_reads(devkit: Path):
    from torchvision.datasets import StanfordCars

    for split in ("train", "test"):
        samples, classes = read_cars(devkit, split)
        theirs = StanfordCars(str(devkit), split=split)
        assert [(s.path, s.label) for s in samples] == theirs._samples
        assert classes == theirs.classes == CLASSES
        assert samples[0].box == (2, 3, SIZES[0][1] - 1, SIZES[0][0] - 2)
    # The stanford_cars folder itself is accepted too, and the labels are 0-based.
    samples, _ = read_cars(devkit / "stanford_cars", "train")
    assert [s.label for s in samples] == [0, 1, 2, 0, 1, 2]


def test_a_one_entry_annotation_file_and_test_labels_in_devkit(tmp_path: Path):
    base = devkit_layout(tmp_path, n_test=1)
    # torchvision's squeeze_me read makes a lone annotation a scalar; and some copies keep
    # the labelled test annotations in devkit/.
    (base / "cars_test_annos_withlabels.mat").rename(base / "devkit" / "cars_test_annos_withlabels.mat")
    samples, _ = read_cars(tmp_path, "test")
    assert [(Path(s.path).name, s.label) for s in samples] == [("00001.jpg", 0)]


def test_csv_layout(tmp_path: Path):
    for j, (h, w) in enumerate(SIZES[:5]):
        write_image(tmp_path / f"car{j}.jpg", h, w, seed=j)
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["filename", "label", "split"])
        # The post's annots.csv classes (1..196); 10 sorts after 2 as a number.
        for j, (label, split) in enumerate([(10, "train"), (2, "train"), (1, "test"),
                                            (2, "test"), (1, "train")]):
            out.writerow([f"car{j}.jpg", label, split])
    train, classes = read_cars(tmp_path, "train")
    test, _ = read_cars(tmp_path, "test")
    assert classes == ["1", "2", "10"]
    assert [(Path(s.path).name, s.label) for s in train] == [("car0.jpg", 2), ("car1.jpg", 1),
                                                              ("car4.jpg", 0)]
    assert [s.label for s in test] == [0, 1] and test[0].box is None


@pytest.mark.parametrize("breakage", ["no folder", "empty folder", "bad csv header",
                                      "missing image", "unlabelled test file"])
def test_missing_or_broken_data_is_one_line(tmp_path: Path, breakage: str):
    data = tmp_path / "cars"
    if breakage == "empty folder":
        data.mkdir()
    elif breakage == "bad csv header":
        data.mkdir()
        (data / "labels.csv").write_text("fname,class\na.jpg,1\n")
    elif breakage == "missing image":
        devkit_layout(data)
        (data / "stanford_cars" / "cars_train" / "00003.jpg").unlink()
    elif breakage == "unlabelled test file":
        base = devkit_layout(data)
        sio.savemat(base / "cars_test_annos_withlabels.mat",
                    {"annotations": annotations([("00001.jpg", 1, (1, 1, 5, 5))], labels=False)})
    split = "test" if breakage == "unlabelled test file" else "train"
    with pytest.raises(UserError) as e:
        read_cars(data, split)
    message = str(e.value)
    assert "\n" not in message
    expected = {"no folder": ["--data-dir", "cars_meta.mat", "cars_train_annos.mat",
                              "labels.csv", "filename,label,split"],
                "empty folder": ["--data-dir", "cars_meta.mat", "labels.csv"],
                "bad csv header": ["filename,label,split"],
                "missing image": ["1 of the 6 train images", "00003.jpg"],
                "unlabelled test file": ["withlabels"]}[breakage]
    assert all(word in message for word in expected), message


# ---- transforms against fastai's definitions ------------------------------------------
def normalized(x01: torch.Tensor) -> torch.Tensor:
    m, s = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1), torch.tensor(IMAGENET_STD).view(-1, 1, 1)
    return (x01 - m) / s


def test_eval_transform_scales_the_shorter_side_and_centre_crops_rounding_up():
    img = torch.randint(0, 256, (3, 20, 33), dtype=torch.uint8)
    # Shorter side already 20: no resampling; 13 spare columns, fastai starts at ceil(6.5).
    out = eval_image(img, size=20)
    torch.testing.assert_close(out, normalized(img[:, :, 7:27].float() / 255))
    flat = torch.full((3, 30, 50), 200, dtype=torch.uint8)
    torch.testing.assert_close(eval_image(flat, size=16),
                               normalized(torch.full((3, 16, 16), 200 / 255)))


def test_side_on_parameters_are_fastais_draws():
    u = torch.tensor([[0.5, 0.4, 0.1, 0.75, 1.0, 0.0, 0.2, 0.3, 0.9],    # all applied
                      [0.8, 0.4, 0.9, 0.75, 0.5, 0.75, 0.7, 0.0, 0.0]])  # no zoom/rotation/flip
    p = SideOn().params(u)
    torch.testing.assert_close(p["zoom"], torch.tensor([1 + 0.05 * 0.4, 1.0]))
    torch.testing.assert_close(p["deg"], torch.tensor([5.0, 0.0]))
    torch.testing.assert_close(p["brightness"], torch.tensor([0.05, 0.0]))
    # RandomLighting: c = U(-0.05, 0.05); c < 0 -> -1/(c-1) (1/1.05 at the low end), else c+1.
    torch.testing.assert_close(p["contrast"], torch.tensor([1 / 1.05, 1.025]))
    assert p["flip"].tolist() == [True, False]


def test_warp_rotates_like_cv2_and_zooms_by_resampling():
    img = torch.zeros(1, 1, 41, 41)
    img[..., 19:22, 29:32] = 1  # a blob 10 px right of the centre pixel (20, 20)
    one, zero = torch.ones(1), torch.zeros(1)
    turned = _warp(img, one, torch.tensor([90.0]), torch.tensor([False]), zero, zero, 41)
    # cv2.getRotationMatrix2D(angle=90): counter-clockwise on screen, so right -> above.
    assert (turned[0, 0] > 0.99).nonzero().float().mean(0).tolist() == [10.0, 20.0]
    ramp = torch.arange(16.0).expand(1, 1, 16, 16)
    zoomed = _warp(ramp, torch.tensor([2.0]), zero, torch.tensor([False]), zero, zero, 16)
    # Output pixel j samples the source at (j + 0.5) / 2 - 0.5 (exact on a ramp, inside).
    j = torch.arange(1, 16.0)
    torch.testing.assert_close(zoomed[0, 0, 5, 1:], (j + 0.5) / 2 - 0.5)


def neutral(**changes) -> torch.Tensor:
    """Uniforms for no zoom, rotation, lighting change or flip, crop at the top left."""
    u = torch.tensor([0.9, 0.0, 0.9, 0.5, 0.5, 0.5, 0.9, 0.0, 0.0])
    for i, v in changes.items():
        u[int(i[1:])] = v
    return u


def test_training_transform_without_randomness_is_a_scale_and_crop():
    img = torch.randint(0, 256, (3, 24, 40), dtype=torch.uint8)
    plain = SideOn().image(img, neutral(), size=24)
    torch.testing.assert_close(plain, normalized(img[:, :, :24].float() / 255),
                               atol=1e-5, rtol=0)
    flipped = SideOn().image(img, neutral(u6=0.1), size=24)  # flip, then crop at the left
    torch.testing.assert_close(flipped, normalized(img.flip(-1)[:, :, :24].float() / 255),
                               atol=1e-5, rtol=0)
    right = SideOn().image(img, neutral(u8=0.99), size=24)  # floor(0.99 * 16) = 15
    torch.testing.assert_close(right, normalized(img[:, :, 15:39].float() / 255),
                               atol=1e-5, rtol=0)


def test_batch_augmentation_for_tta():
    x = normalized(torch.rand(3, 3, 16, 16))
    aug = SideOn()
    same = aug(x, lambda n: neutral().expand(3, n))
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    torch.testing.assert_close(aug(x, lambda n: neutral(u6=0.0).expand(3, n)), x.flip(-1),
                               atol=1e-5, rtol=0)
    a = aug(x, ExampleDraw(0, 1, [4, 5, 6], x.device))
    assert torch.equal(a, aug(x, ExampleDraw(0, 1, [4, 5, 6], x.device)))
    assert torch.equal(a[1:], aug(x[1:], ExampleDraw(0, 1, [5, 6], x.device)))
    assert not torch.allclose(a, x, atol=1e-3)


# ---- the dataset through the toolkit's loaders -----------------------------------------
def test_augmentation_is_a_function_of_seed_epoch_and_index(devkit: Path):
    samples, _ = read_cars(devkit, "train")
    ds = CarsImages(samples, size=16, augment=SideOn(), seed=5)
    x, y = ds[(2, 3)]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 0
    assert torch.equal(x, ds[(2, 3)][0])
    assert not torch.equal(x, ds[(3, 3)][0])
    assert not torch.equal(x, CarsImages(samples, size=16, augment=SideOn(), seed=6)[(2, 3)][0])
    same_image = CarsImages([samples[3]] * 4, size=16, augment=SideOn(), seed=5)
    assert torch.equal(same_image[(2, 3)][0], x) and not torch.equal(same_image[(2, 0)][0], x)
    with pytest.raises(TypeError, match="EpochLoader"):
        ds[3]
    gray = decode(samples[1].path)
    assert gray.shape[0] == 3 and torch.equal(gray[0], gray[2])  # grayscale JPEG as RGB


class KeyedImages(CarsImages):
    """Also returns the key it was given."""

    def __getitem__(self, key):
        return (*super().__getitem__(key), torch.tensor(key))


def test_workers_and_resume_see_the_same_augmented_batches(devkit: Path):
    samples, _ = read_cars(devkit, "train")

    def stream(workers: int, step: int, world: int = 1, rank: int = 0, n: int = 4):
        ds = KeyedImages(samples, size=16, augment=SideOn(), seed=1)
        data = EpochLoader(ds, seed=1, num_workers=workers).shard(
            batch_size=2, world=world, rank=rank, accum=1, device=torch.device("cpu"))
        it = data.batches(step)
        return [next(it) for _ in range(n)]

    alone = stream(0, 0, n=6)  # 3 steps per epoch: two epochs
    for got, want in zip(stream(2, 0, n=6), alone):  # two worker processes
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for got, want in zip(stream(2, 2), alone[2:]):  # resumed at step 2, across the epoch end
        assert torch.equal(got[0], want[0])
    halves = [stream(0, 0, world=2, rank=r, n=6) for r in range(2)]  # each rank one example
    for step, want in enumerate(alone):
        assert torch.equal(torch.cat([halves[0][step][0], halves[1][step][0]]), want[0])
    # Each example of epoch e was given the key (e, index), and is that key's augmentation.
    keys = torch.cat([batch[2] for batch in alone])
    assert keys[:, 0].tolist() == [0] * 6 + [1] * 6
    assert sorted(keys[:6, 1].tolist()) == sorted(keys[6:, 1].tolist()) == list(range(6))
    ds = CarsImages(samples, size=16, augment=SideOn(), seed=1)
    images = torch.cat([batch[0] for batch in alone])
    for image, (epoch, index) in zip(images, keys.tolist()):
        assert torch.equal(image, ds[(epoch, index)][0])


def test_cars_data_gives_the_trainer_its_two_kinds(devkit: Path):
    train, test, classes = cars_data(devkit, size=16, num_workers=0)
    assert isinstance(train, EpochLoader) and classes == CLASSES
    view = test.shard(batch_size=4, world=1, rank=0, accum=1, device=torch.device("cpu"))
    x, y = next(view.eval_batches())
    assert x.shape == (4, 3, 16, 16) and y.tolist() == [0, 1, 2, 0]
    assert torch.equal(x[0], eval_image(decode(read_cars(devkit, "test")[0][0].path), 16))


# ---- ResNet50 --------------------------------------------------------------------------
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
