"""``recipes/images.py`` on generated images (tests/image_folder.py: three patterns, mixed
sizes and modes, one corrupt file): it learns from scratch well above chance and reloads
through ``toolkit evaluate``; it fine-tunes a torchvision ResNet from a local weights file
in two stages and resumes exactly mid-stage; a ``save_to_disk`` folder trains the same as
the image folder; every bad input named in the issue is one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import image_folder
from conftest import ROOT, launch
from test_evaluate import evaluate
from toolkit.run_folder import RunFolder

IMAGES = ROOT / "recipes" / "images.py"
SMALL = ["--arch", "resnet18", "--size", "32", "--batch-size", "24", "--workers", "1",
         "--no-progress"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images") / "photos"
    image_folder.write(root, corrupt=True)
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A resnet18 state dict in torchvision's keys, as a user's downloaded file would be."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def test_scratch_learns_skipping_the_corrupt_file_and_reloads(folder, tmp_path):
    run = tmp_path / "run"
    proc = launch(IMAGES, ["--preset", "scratch", "--data-dir", str(folder), "--output-dir",
                           str(run), "--epochs", "8", "--skip-bad-images", *SMALL])
    assert "skipped 1 unreadable, the first" in proc.stdout and "corrupt.jpg" in proc.stdout
    results = RunFolder(run).read_results()
    assert results["valid_accuracy"] > 0.6, results  # 3 classes: chance is 1/3
    spec = RunFolder(run).read_model_spec()
    assert spec["args"]["classes"] == list(image_folder.CLASSES)
    evaluate(str(run))
    got = json.loads((run / "eval.json").read_text())
    assert got["valid_accuracy"] == pytest.approx(results["valid_accuracy"], abs=1e-9)


@pytest.mark.slow  # ~30 s: CI runs it after the default run
def test_fine_tune_from_local_weights_in_two_stages_resumes_exactly(folder, weights, tmp_path):
    args = ["--data-dir", str(folder), "--weights", str(weights), "--freeze-epochs", "1",
            "--epochs", "2", "--checkpoint-every", "4", "--skip-bad-images", "--no-tta", *SMALL]
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    proc = launch(IMAGES, [*args, "--output-dir", str(run)])
    assert "training 15 steps" in proc.stdout, proc.stdout  # 5 steps head alone, 10 all
    stages = {r["stage"] for r in RunFolder(run).read_metrics() if "stage" in r}
    assert stages == {0, 1}
    launch(IMAGES, [*args, "--output-dir", str(resumed), "--resume",
                    str(run / "checkpoints" / "step_12")])
    a, b = RunFolder(run).read_weights(), RunFolder(resumed).read_weights()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow  # ~30 s: CI runs it after the default run
def test_a_datasets_folder_trains_like_the_image_folder(folder, tmp_path):
    clean = tmp_path / "clean"
    shutil.copytree(folder, clean)
    (clean / "train" / image_folder.CLASSES[0] / "corrupt.jpg").unlink()
    files = {split: [(p, p.parent.name) for p in sorted((clean / split).rglob("*.*"))]
             for split in ("train", "valid")}
    hf = image_folder.write_datasets(tmp_path / "hf", files)
    args = ["--preset", "scratch", "--epochs", "2", "--no-tta", *SMALL]
    launch(IMAGES, [*args, "--data-dir", str(hf), "--output-dir", str(tmp_path / "a")])
    launch(IMAGES, [*args, "--data-dir", str(clean), "--output-dir", str(tmp_path / "b")])
    a, b = (RunFolder(tmp_path / n).read_results() for n in "ab")
    assert a["valid_accuracy"] == b["valid_accuracy"]
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


@pytest.mark.slow  # ~40 s: CI runs it after the default run
def test_two_processes_under_zero2_and_the_lr_finder(folder, tmp_path):
    common = ["--preset", "scratch", "--data-dir", str(folder), "--skip-bad-images", "--no-tta",
              *SMALL]
    run = tmp_path / "zero2"
    proc = launch(IMAGES, [*common, "--output-dir", str(run), "--epochs", "2", "--strategy",
                           "zero2"], launcher="torchrun")
    assert "on 2 process(es)" in proc.stdout and "(zero2)" in proc.stdout, proc.stdout
    assert 0 <= RunFolder(run).read_results()["valid_accuracy"] <= 1
    found = tmp_path / "lr"
    launch(IMAGES, [*common, "--output-dir", str(found), "--lr-find"])
    assert RunFolder(found).read_lr_find()["suggestions"]


def bad_folder(tmp: Path, case: str) -> tuple[Path, list[str], str]:
    """A data folder with one fault, extra flags, and the line it must give."""
    root = tmp / case
    image_folder.write(root, {"train": 2, "valid": 1}, corrupt=case == "corrupt")
    c0, c1 = image_folder.CLASSES[:2]
    if case == "corrupt":
        return root, [], "corrupt.jpg: not a readable image"
    if case == "empty-class":
        for f in (root / "train" / c1).iterdir():
            f.unlink()
        return root, [], f"class '{c1}' has no images"
    if case == "one-class":
        for split in ("train", "valid"):
            for c in image_folder.CLASSES[1:]:
                shutil.rmtree(root / split / c)
        return root, [], f"one class only ('{c0}')"
    if case == "unknown-label":
        (root / "valid" / "zebra").mkdir()
        shutil.copy(next((root / "valid" / c0).iterdir()), root / "valid" / "zebra" / "z.jpg")
        return root, [], "valid label 'zebra'"
    if case == "csv-unknown-label":
        shutil.rmtree(root / "valid")
        lines = ["filename,label,split"] + [
            f"{p.relative_to(root)},{p.parent.name},train" for p in (root / "train").rglob("*.*")]
        lines.append(f"{next((root / 'train' / c0).iterdir()).relative_to(root)},zebra,valid")
        (root / "labels.csv").write_text("\n".join(lines) + "\n")
        return root, [], "valid label 'zebra'"
    if case == "missing-weights":
        return root, ["--weights", str(tmp / "nope.pth")], "nope.pth is not a file"
    raise ValueError(case)


@pytest.mark.parametrize("case", ["corrupt", "csv-unknown-label"])
def test_bad_input_is_one_line(case, tmp_path):
    root, extra, expected = bad_folder(tmp_path, case)
    run = tmp_path / "run"
    proc = launch(IMAGES, ["--data-dir", str(root), "--output-dir", str(run), *SMALL, *extra],
                  check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert expected in proc.stderr, proc.stderr
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


@pytest.mark.parametrize("case", ["empty-class", "one-class", "unknown-label", "missing-weights"])
def test_more_bad_input_is_one_line(case, tmp_path):
    """The other faults, in this process (the two above show the whole program's exit 2 and
    one line for such an error)."""
    from recipes import images
    from toolkit.config import parse
    from toolkit.errors import UserError

    root, extra, expected = bad_folder(tmp_path, case)
    cfg = parse(images.PRESETS, ["--data-dir", str(root), "--output-dir",
                                 str(tmp_path / "run"), *SMALL, *extra])
    with pytest.raises(UserError) as e:
        images.build(cfg)
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_hf_name_goes_through_load_dataset(folder):
    """``hf:NAME`` is ``datasets.load_dataset(NAME)``: here a local image folder (its
    imagefolder builder; nothing downloads), with the folder reader's classes and counts."""
    from toolkit.data.images import read_images

    via_hf, classes = read_images(f"hf:{folder}")
    direct, same = read_images(str(folder))
    assert classes == same == list(image_folder.CLASSES)
    assert {k: len(v.samples) for k, v in via_hf.items()} == \
        {k: len(v.samples) for k, v in direct.items()}
