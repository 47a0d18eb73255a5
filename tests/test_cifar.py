"""CIFAR-10 and WRN-22: files in both official layouts (written here, byte for byte as the
format says) load to the same exact pixels and labels; damaged files are refused in one
line; the real copy in ../shared/data has the counts and statistics of its SOURCES.md; the
augmentation equals numpy's padding and slicing for known draws, is a function of (seed,
step) and gives N processes what one gets; WRN-22 has fastai 0.7's parameter count and
computes what a functional restatement of fastai's blocks computes."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from toolkit.data.cifar import (
    hold_out,
    CLASSES,
    Cifar10,
    PadCropFlip,
    channel_stats,
    device_data,
    load_cifar10,
    normalize,
    padded_index,
)
from toolkit.data.source import DeviceTensors, Draw
from toolkit.errors import UserError
from toolkit.models import WideResNet, wrn_22

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("CIFAR10_DIR", ROOT.parent / "shared" / "data" / "cifar-10-batches-bin"))
CPU = torch.device("cpu")
PER_FILE = 7  # records in each generated file
NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
# SOURCES.md: label counts 0..9 of data_batch_1; every class has 5,000 / 1,000 images.
BATCH1_COUNTS = [1005, 974, 1032, 1016, 999, 937, 1030, 1001, 1025, 981]


def synthetic(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per file: images [n, 3, 32, 32] uint8 (CHW) and labels, random but fixed."""
    rng = np.random.default_rng(seed)
    return {n: (rng.integers(0, 256, (PER_FILE, 3, 32, 32), dtype=np.uint8),
                rng.integers(0, 10, PER_FILE)) for n in NAMES}


def write_binary(folder: Path, files, gz: bool) -> Path:
    """The binary version: per record one label byte, then red, green, blue planes, each
    32x32 row-major, which is the C order of a [3, 32, 32] array."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (x, y) in files.items():
        raw = b"".join(bytes([int(label)]) + img.tobytes() for img, label in zip(x, y))
        if gz:
            (folder / f"{name}.bin.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / f"{name}.bin").write_bytes(raw)
    (folder / "batches.meta.txt").write_text("\n".join(CLASSES) + "\n\n")
    return folder


def write_pickles(folder: Path, files, key: type = str, numpy1: bool = False) -> Path:
    """The python version: a dict per file, ``data`` [n, 3072] uint8 rows in the same order
    as the binary records; ``key=bytes`` writes the keys as the official page shows them,
    ``numpy1`` names numpy's array constructor as the official files (and numpy 1) do."""
    folder.mkdir(parents=True, exist_ok=True)
    k = (lambda s: s.encode()) if key is bytes else (lambda s: s)
    for name, (x, y) in files.items():
        d = {k("batch_label"): name, k("labels"): [int(v) for v in y],
             k("data"): x.reshape(len(x), -1), k("filenames"): [f"{i}.png" for i in range(len(x))]}
        raw = pickle.dumps(d, protocol=2)
        if numpy1:
            raw = raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        (folder / name).write_bytes(raw)
    meta = {k("num_cases_per_batch"): PER_FILE, k("label_names"): list(CLASSES), k("num_vis"): 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def expected(files):
    train = [files[n] for n in NAMES[:5]]
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
            *files["test_batch"])


def assert_loaded(data, files) -> None:
    tx, ty, ex, ey = expected(files)
    assert data.train_x.dtype == torch.uint8 and data.train_y.dtype == torch.int64
    assert data.train_x.shape == (5 * PER_FILE, 3, 32, 32)
    assert data.test_x.shape == (PER_FILE, 3, 32, 32)
    assert np.array_equal(data.train_x.numpy(), tx) and np.array_equal(data.train_y.numpy(), ty)
    assert np.array_equal(data.test_x.numpy(), ex) and np.array_equal(data.test_y.numpy(), ey)
    assert data.classes == CLASSES


# ---- loading ----------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_binary_layout_loads_exact_pixels_and_labels(tmp_path, gz):
    files = synthetic()
    folder = write_binary(tmp_path / "cifar-10-batches-bin", files, gz)
    data = load_cifar10(folder, records_per_file=PER_FILE)
    assert_loaded(data, files)
    # CHW: byte 1 + 1024 * c + 32 * h + w of a record is channel c, row h, column w.
    raw = (gzip.decompress if gz else bytes)((folder / f"test_batch.bin{'.gz' * gz}").read_bytes())
    rec = np.frombuffer(raw, np.uint8)[3 * 3073:4 * 3073]
    assert data.test_y[3] == rec[0]
    assert data.test_x[3, 2, 5, 7] == rec[1 + 2 * 1024 + 5 * 32 + 7]
    assert data.test_x[3, 0, 31, 0] == rec[1 + 31 * 32]
    # The parent folder works too.
    assert torch.equal(load_cifar10(tmp_path, records_per_file=PER_FILE).train_x, data.train_x)


@pytest.mark.parametrize("key, numpy1", [(str, False), (bytes, False), (str, True)])
def test_pickle_layout_loads_the_same_as_binary(tmp_path, key, numpy1):
    files = synthetic(1)
    write_pickles(tmp_path / "cifar-10-batches-py", files, key, numpy1)
    if numpy1:
        assert b"cnumpy.core.multiarray\n_reconstruct" in (tmp_path / "cifar-10-batches-py"
                                                            / "test_batch").read_bytes()
    for folder in (tmp_path, tmp_path / "cifar-10-batches-py"):  # torchvision's root, or itself
        assert_loaded(load_cifar10(folder, records_per_file=PER_FILE), files)
    write_binary(tmp_path / "b", files, gz=True)
    a = load_cifar10(tmp_path, records_per_file=PER_FILE)
    b = load_cifar10(tmp_path / "b", records_per_file=PER_FILE)
    assert all(torch.equal(u, v) for u, v in zip(a[:4], b[:4]))


def one_line_error(fn, *match: str) -> str:
    with pytest.raises(UserError) as err:
        fn()
    msg = str(err.value)
    assert "\n" not in msg and all(m in msg for m in match), msg
    return msg


def test_damaged_files_are_refused_in_one_line_naming_them(tmp_path):
    files = synthetic()
    load = lambda f, n=PER_FILE: lambda: load_cifar10(f, records_per_file=n)  # noqa: E731
    cut = write_binary(tmp_path / "cut", files, gz=False)
    path = cut / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-100])  # mid-record
    one_line_error(load(cut), str(path), "truncated")
    path.write_bytes(path.read_bytes()[:3073 * 4])  # at a record boundary: 4 of the 7 records
    one_line_error(load(cut), str(path), "truncated")
    cut_gz = write_binary(tmp_path / "cut_gz", files, gz=True)
    path = cut_gz / "test_batch.bin.gz"
    path.write_bytes(path.read_bytes()[:5000])
    one_line_error(load(cut_gz), str(path), "truncated")
    # By default a file must hold the official 10,000 records.
    one_line_error(load(write_binary(tmp_path / "small", files, gz=False), 10_000),
                   "data_batch_1.bin", "10,000")
    cut_py = write_pickles(tmp_path / "cut_py", files)
    path = cut_py / "data_batch_5"
    path.write_bytes(path.read_bytes()[:2000])
    one_line_error(load(cut_py), str(path), "truncated")
    bad = {**files, "data_batch_2": (files["data_batch_2"][0], np.full(PER_FILE, 10))}
    one_line_error(load(write_binary(tmp_path / "label", bad, gz=False)),
                   "data_batch_2.bin", "outside 0..9")
    missing = write_binary(tmp_path / "missing", files, gz=True)
    (missing / "data_batch_4.bin.gz").unlink()
    one_line_error(load(missing), "lacks data_batch_4.bin[.gz]")
    one_line_error(load(tmp_path / "nowhere"), "--data-dir", "not a folder")
    one_line_error(load(tmp_path / "missing" / ".."), "holds no CIFAR-10")


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    files = synthetic()
    folder = write_pickles(tmp_path / "py", files)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    (folder / "test_batch").write_bytes(pickle.dumps({"data": Payload()}, protocol=2))
    one_line_error(lambda: load_cifar10(folder, records_per_file=PER_FILE), "test_batch",
                   "system")
    assert not marker.exists()


def test_hugging_face_dataset_gives_chw_tensors(monkeypatch):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    files = synthetic(2)
    features = datasets.Features({"img": datasets.Image(),
                                  "label": datasets.ClassLabel(names=list(CLASSES))})

    def split(names):
        x = np.concatenate([files[n][0] for n in names])
        y = np.concatenate([files[n][1] for n in names])
        rows = {"img": [Image.fromarray(i.transpose(1, 2, 0)) for i in x],
                "label": [int(v) for v in y]}
        return datasets.Dataset.from_dict(rows, features=features)
    dd = datasets.DatasetDict({"train": split(NAMES[:5]), "test": split(NAMES[5:])})
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: asked.append(a) or dd)
    data = load_cifar10(None)
    assert asked == [("uoft-cs/cifar10",)]
    assert_loaded(data, files)


def test_offline_without_data_dir_names_the_flag(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'uoft-cs/cifar10' on the Hub (LocalEntryNotFound)"
                              "\n(details)")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    one_line_error(lambda: load_cifar10(None), "--data-dir", "Couldn't reach")


@pytest.fixture(scope="module")
def real():
    if not any((REAL / f"data_batch_1.bin{s}").is_file() for s in ("", ".gz")):
        pytest.skip(f"no CIFAR-10 at {REAL}; set CIFAR10_DIR to a cifar-10-batches-bin folder")
    return load_cifar10(REAL)


def test_real_data_counts_and_statistics(real):
    assert real.train_x.shape == (50_000, 3, 32, 32) and real.test_x.shape == (10_000, 3, 32, 32)
    assert torch.bincount(real.train_y[:10_000]).tolist() == BATCH1_COUNTS
    assert torch.bincount(real.train_y).tolist() == [5000] * 10
    assert torch.bincount(real.test_y).tolist() == [1000] * 10
    assert real.classes == CLASSES
    mean, std = channel_stats(real.train_x)
    assert np.allclose(mean, (0.4914, 0.4822, 0.4465), atol=6e-5), mean
    assert np.allclose(std, (0.2470, 0.2435, 0.2616), atol=6e-5), std
    mean, std = channel_stats(real.test_x)
    assert np.allclose(mean, (0.4942, 0.4851, 0.4504), atol=6e-5), mean
    assert np.allclose(std, (0.2467, 0.2429, 0.2616), atol=6e-5), std


def test_real_data_through_device_data(real):
    train, test = device_data(real, seed=5)
    train = train.shard(batch_size=512, world=1, rank=0, accum=1, device=CPU)
    x, y = next(train.batches(0))
    assert x.shape == (512, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    test = test.shard(batch_size=512, world=1, rank=0, accum=1, device=CPU)
    ex, ey = next(test.eval_batches())
    mean, std = channel_stats(real.train_x)
    assert torch.equal(ex, normalize(real.test_x[:512], mean, std))
    assert torch.equal(ey, real.test_y[:512])


# ---- statistics and augmentation ------------------------------------------------------------
def test_a_holdout_is_training_images_kept_out_of_training():
    n = 50
    data = Cifar10(torch.arange(n).view(n, 1, 1, 1).expand(n, 3, 32, 32).to(torch.uint8),
                   torch.arange(n) % 10, torch.zeros(4, 3, 32, 32, dtype=torch.uint8),
                   torch.zeros(4, dtype=torch.long), tuple("abcdefghij"))
    split = hold_out(data, 10)
    valid, train = split.test_x[:, 0, 0, 0].tolist(), split.train_x[:, 0, 0, 0].tolist()
    assert len(valid) == 10 and len(train) == 40 and sorted(valid + train) == list(range(n))
    assert split.test_y.tolist() == [v % 10 for v in valid]  # labels travel with images
    assert hold_out(data, 10).test_x.equal(split.test_x)  # one fixed draw
    assert valid != list(range(10)) and valid != list(range(40, 50))  # a draw, not a slice
    for bad in (0, 50):
        with pytest.raises(UserError, match=f"--holdout {bad} must be between 1 and 49"):
            hold_out(data, bad)


def test_channel_stats_and_normalize_give_zero_mean_unit_std():
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    x[:, 1] //= 3  # channels with other statistics
    mean, std = channel_stats(x)
    ref = x.double().div(255).transpose(0, 1).reshape(3, -1)
    assert np.allclose(mean, ref.mean(1).numpy(), rtol=1e-12)
    assert np.allclose(std, ref.std(1, correction=0).numpy(), rtol=1e-12)
    z = normalize(x, mean, std)
    assert z.dtype == torch.float32
    z = z.double().transpose(0, 1).reshape(3, -1)
    assert torch.allclose(z.mean(1), torch.zeros(3, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(z.std(1, correction=0), torch.ones(3, dtype=torch.float64), atol=1e-6)


def test_padded_index_is_cv2_reflect_and_torch_reflect():
    # cv2.BORDER_REFLECT (fastai 0.7) repeats the edge: numpy's "symmetric".
    assert padded_index(5, 2).tolist() == [1, 0, 0, 1, 2, 3, 4, 4, 3]
    assert padded_index(5, 2).tolist() == np.pad(np.arange(5), 2, mode="symmetric").tolist()
    assert padded_index(5, 2, "reflect").tolist() == [2, 1, 0, 1, 2, 3, 4, 3, 2]
    ref = F.pad(torch.arange(5.0).view(1, 1, 5), (2, 2), mode="reflect").long().view(-1)
    assert padded_index(5, 2, "reflect").tolist() == ref.tolist()


MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def fixed(u: list[list[float]]):
    """A ``draw`` that returns the given numbers for a batch."""
    def draw(*shape):
        assert shape == (3,)
        return torch.tensor(u)
    return draw


def numpy_reference(img: np.ndarray, dy: int, dx: int, flip: bool, mode="symmetric"):
    padded = np.pad(img, ((0, 0), (4, 4), (4, 4)), mode=mode)
    out = padded[:, dy:dy + 32, dx:dx + 32]
    out = out[:, :, ::-1] if flip else out
    m, s = (np.array(v, np.float32)[:, None, None] for v in (MEAN, STD))
    return (out.astype(np.float32) / np.float32(255) - m) / s


@pytest.mark.parametrize("mode", ["symmetric", "reflect"])
def test_augmentation_is_pad_crop_flip_normalize_for_known_draws(mode):
    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    # (u_row, u_col, u_flip): starts floor(8 u), flip when u_flip < 0.5.
    u = [[0.0, 0.0, 0.9], [0.9999, 0.9999, 0.1], [0.5, 0.26, 0.5], [0.13, 0.74, 0.49],
         [0.3, 0.6, 0.0]]
    starts = [(0, 0, False), (7, 7, True), (4, 2, False), (1, 5, True), (2, 4, True)]
    aug = PadCropFlip(MEAN, STD, pad_mode=mode)
    out, idx = aug((torch.from_numpy(imgs), torch.arange(5)), fixed(u))
    assert out.dtype == torch.float32 and out.shape == (5, 3, 32, 32)
    assert idx.tolist() == [0, 1, 2, 3, 4]
    for i, (dy, dx, flip) in enumerate(starts):
        ref = numpy_reference(imgs[i], dy, dx, flip, mode)
        assert np.array_equal(out[i].numpy(), ref), (i, dy, dx, flip)
    # By hand: start (0, 0) puts padded pixel (0, 0) at the corner, source (3, 3) when the edge
    # is repeated (4 padded rows: 3, 2, 1, 0), (4, 4) when it is not.
    corner = 3 if mode == "symmetric" else 4
    src = normalize(torch.from_numpy(imgs[:1, :, corner, corner]).view(1, 3, 1, 1), MEAN, STD)
    assert torch.equal(out[0, :, 0, 0], src.view(3))


def test_crop_starts_fastai_draws_0_to_7_torchvision_0_to_8():
    u = torch.rand(4000, 3, generator=torch.Generator().manual_seed(0))
    u[0] = 1 - 2 ** -24  # the largest float32 below 1
    for offsets, positions in (("fastai", 8), ("all", 9)):
        rows, cols = PadCropFlip(MEAN, STD, offsets=offsets).crop_indices(u, 32, 32)
        # Crop row 4 is padded row start + 4, inside the image: source row start + 4 - 4.
        starts = rows[:, 4]
        assert torch.equal(starts, (u[:, 0] * positions).long())
        assert sorted(starts.unique().tolist()) == list(range(positions))
        assert torch.equal(cols[:, 0] > cols[:, 31], u[:, 2] < 0.5)  # flipped: columns run back
    assert 0.45 < (u[:, 2] < 0.5).float().mean() < 0.55


def test_constant_images_stay_constant_and_channels_last():
    x = torch.zeros(6, 3, 32, 32, dtype=torch.uint8)
    x[:, 0], x[:, 1], x[:, 2] = 10, 128, 250
    draw = Draw(7, 3, slice(0, 6), 6, CPU)
    out, = PadCropFlip(MEAN, STD, channels_last=True)((x,), draw)
    assert out.is_contiguous(memory_format=torch.channels_last)
    want = [(v / 255 - m) / s for v, m, s in zip((10, 128, 250), MEAN, STD)]
    assert torch.allclose(out, torch.tensor(want).view(1, 3, 1, 1).expand_as(out), atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        PadCropFlip(MEAN, STD)((out,), draw)


def test_augmentation_is_a_function_of_seed_and_step():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    aug = PadCropFlip(MEAN, STD)

    def run(seed, step):
        return aug((x,), Draw(seed, step, slice(0, 16), 16, CPU))[0]
    assert torch.equal(run(1, 5), run(1, 5))
    assert not torch.equal(run(1, 5), run(1, 6)) and not torch.equal(run(1, 5), run(2, 5))


N, BATCH, STEPS = 48, 12, 6


def shard(world=1, rank=0, accum=1):
    x = torch.from_numpy(np.random.default_rng(4).integers(0, 256, (N, 3, 32, 32), dtype=np.uint8))
    data = DeviceTensors(x, torch.arange(N), seed=9, augment=PadCropFlip(MEAN, STD))
    return data.shard(batch_size=BATCH, world=world, rank=rank, accum=accum, device=CPU)


def take(data, steps, accum):
    it = data.batches(0)
    return [[next(it) for _ in range(accum)] for _ in range(steps)]


@pytest.mark.parametrize("world, accum", [(2, 1), (1, 2), (3, 2)])
def test_processes_and_accumulation_augment_as_one_process(world, accum):
    one = take(shard(), STEPS, 1)
    ranks = [take(shard(world, r, accum), STEPS, accum) for r in range(world)]
    for step in range(STEPS):
        parts = [ranks[r][step][a] for a in range(accum) for r in range(world)]
        for i in range(2):
            assert torch.equal(torch.cat([p[i] for p in parts]), one[step][0][i]), step
    # ...and a resume at step 4 draws what the uninterrupted run drew there.
    it = shard().batches(4)
    assert torch.equal(next(it)[0], one[4][0][0])


# ---- WRN-22 -----------------------------------------------------------------------------
def test_wrn22_parameter_count_and_shapes():
    model = wrn_22()
    # Stem 3*16*9; per group the first block (BN in, 3x3 in->out, BN, 3x3 out->out, 1x1
    # shortcut) and two blocks at the group's width; head BN(384) and Linear(384, 10).
    def block(ni, nf):
        return 2 * ni + 9 * ni * nf + 2 * nf + 9 * nf * nf + (ni * nf if ni != nf else 0)
    widths = [16, 96, 192, 384]
    count = 3 * 16 * 9 + sum(block(a, b) + 2 * block(b, b) for a, b in zip(widths, widths[1:]))
    count += 2 * 384 + 384 * 10 + 10
    assert count == 9_658_458 == sum(p.numel() for p in model.parameters())
    groups = model.layer_groups()
    sizes = [sum(p.numel() for p in g.parameters()) for g in groups]
    assert sizes == [431_504, 1_845_312, 7_381_642]
    assert sum(len(g) for g in groups) == len(model.features)
    shapes = []
    hooks = [model.features[i].register_forward_hook(lambda m, a, o: shapes.append(tuple(o.shape)))
             for i in (3, 6, 9)]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert shapes == [(2, 96, 32, 32), (2, 192, 16, 16), (2, 384, 8, 8)]
    for h in hooks:
        h.remove()


def reference_forward(model: WideResNet, x: torch.Tensor) -> torch.Tensor:
    """fastai 0.7's ``wrn_22`` forward restated with functional ops (eval-mode BN):
    ``x2 = relu(bn(x)); r = shortcut(x2); x = conv1(x2); x = conv2(x) * 0.2; x + r``."""
    def bn(m, t):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    def conv(m, t):
        return F.conv2d(t, m.weight, None, m.stride, m.padding)
    f = model.features
    t = conv(f[0], x)
    for blk in f[1:10]:
        x2 = F.relu(bn(blk.bn, t))
        r = conv(blk.shortcut, x2) if isinstance(blk.shortcut, torch.nn.Conv2d) else x2
        h = conv(blk.conv2[2], F.relu(bn(blk.conv2[0], conv(blk.conv1, x2))))
        t = h * 0.2 + r
    t = F.relu(bn(f[10], t)).mean((2, 3))
    return F.linear(t, f[14].weight, f[14].bias)


def test_wrn22_computes_fastai_blocks_and_is_channels_last_and_bf16_friendly():
    torch.manual_seed(0)
    model = wrn_22().double().eval()
    with torch.no_grad():
        for m in model.modules():  # BN statistics and affines away from 1 and 0
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        want = reference_forward(model, x)
        assert torch.allclose(model(x), want, rtol=1e-10, atol=1e-10)
        model = model.float().to(memory_format=torch.channels_last)
        xf = x.float().contiguous(memory_format=torch.channels_last)
        assert torch.allclose(model(xf).double(), want, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(xf)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        assert (out.double() - want).abs().max() < 0.1 * want.abs().max()
