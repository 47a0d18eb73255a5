"""Stanford Cars data: both layouts built here in the real formats (devkit
``.mat`` files through ``scipy.io.savemat``, read back by torchvision's own
``StanfordCars``), fastai 0.7's side-on transforms against their definitions, augmentation
that is a function of (seed, epoch, index) whatever the workers and after a resume, and the
reading of the data in both kinds the trainer takes (the ResNet50: ``test_resnet.py``)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import scipy.io as sio
import torch

from toolkit.data.cars import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CarsImages,
    SideOn,
    _warp,
    cars_data,
    decode,
    eval_image,
    read_cars,
)
from toolkit.data.source import Loader
from toolkit.errors import UserError
from toolkit.tta import ExampleDraw

from cars_sample import CLASSES, SIZES, annotations, devkit_layout, write_image

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
    with pytest.raises(TypeError, match="epoch_keys=True"):
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
        data = Loader(ds, seed=1, num_workers=workers, epoch_keys=True).shard(
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
    assert isinstance(train, Loader) and train.epoch_keys and classes == CLASSES
    view = test.shard(batch_size=4, world=1, rank=0, accum=1, device=torch.device("cpu"))
    x, y = next(view.eval_batches())
    assert x.shape == (4, 3, 16, 16) and y.tolist() == [0, 1, 2, 0]
    assert torch.equal(x[0], eval_image(decode(read_cars(devkit, "test")[0][0].path), 16))
