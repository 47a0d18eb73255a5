"""Test-time augmentation: fastai's TTA is the mean of the probabilities of the plain pass
(counted ceil(n_aug / 4) times) and the augmented copies, checked by hand on a tiny model;
the deterministic variant's views are exact flips and reflected shifts; the draws belong to
the example, not its batch; and 2 processes under torchrun report what 1 does.

Also a script: ``python tests/test_tta.py OUT.json`` evaluates a tiny model with a real
Trainer and writes :func:`tta_accuracy`'s results (what the 2-process test launches).
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from toolkit.tta import ExampleDraw, flip_shift_views, tta_accuracy, tta_probs

N, SHAPE, CLASSES = 37, (3, 12, 12), 5


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, CLASSES))


def examples(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs, and as labels the tiny model's plain predictions (plain accuracy 1, so that
    TTA's changes show)."""
    x = torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(1))
    return x, softmax(tiny_model(), x).argmax(-1)


def jitter(x: torch.Tensor, draw) -> torch.Tensor:
    """An augmentation with per-pixel noise: strong enough to change predictions."""
    return x + 1.5 * (draw(*x.shape[1:]) - 0.5)


def softmax(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).softmax(-1)


def fake_trainer(model: nn.Module, world: int = 1, rank: int = 0) -> SimpleNamespace:
    """What tta_accuracy reads of a Trainer: its model and its accelerator's place."""
    return SimpleNamespace(model=model, accelerator=SimpleNamespace(
        device=torch.device("cpu"), num_processes=world, process_index=rank))


@pytest.mark.parametrize("n_aug, plain_weight", [(4, 1), (8, 2), (1, 1)])
def test_tta_is_the_mean_of_the_probabilities(n_aug: int, plain_weight: int):
    model, (x, _) = tiny_model(), examples(6)
    copies = []

    def recorded(inputs, draw):
        out = jitter(inputs, draw)
        copies.append(out)
        return out

    got = tta_probs(model, x, range(6), recorded, n_aug)
    assert len(copies) == n_aug
    by_hand = (plain_weight * softmax(model, x) + sum(softmax(model, c) for c in copies)) \
        / (plain_weight + n_aug)
    torch.testing.assert_close(got["tta"], by_hand)
    torch.testing.assert_close(got["plain"], softmax(model, x))
    assert not torch.allclose(got["tta"], got["plain"], atol=1e-3)
    # Each copy is its own draw.
    assert all(not torch.equal(copies[0], c) for c in copies[1:])


def test_fixed_variant_views_are_exact_flips_and_reflected_shifts():
    x = torch.arange(2 * 5 * 6, dtype=torch.float32).view(1, 2, 5, 6)
    views = flip_shift_views(x, shift=2)
    right, left, down, up = views[2:]
    assert len(views) == 6 and torch.equal(views[0], x)
    assert torch.equal(views[1], x[..., torch.arange(5, -1, -1)])
    # out[i, j] = x[i - dy, j - dx] inside; the uncovered border mirrors without the edge.
    assert torch.equal(right[..., 2:], x[..., :-2]) and torch.equal(right[..., :2], x[..., [2, 1]])
    assert torch.equal(left[..., :-2], x[..., 2:]) and torch.equal(left[..., -2:], x[..., [4, 3]])
    assert torch.equal(down[..., 2:, :], x[..., :-2, :])
    assert torch.equal(down[..., :2, :], x[..., [2, 1], :])
    assert torch.equal(up[..., :-2, :], x[..., 2:, :]) and torch.equal(up[..., -2:, :], x[..., [3, 2], :])
    unflipped = flip_shift_views(x, shift=2, flip=False)  # digits: a flip is another digit
    assert len(unflipped) == 5 and all(torch.equal(a, b) for a, b in
                                       zip(unflipped, [views[0], *views[2:]]))
    with pytest.raises(ValueError, match="shift"):
        flip_shift_views(x, shift=5)


def test_fixed_variant_averages_those_views_and_draws_nothing():
    model, (x, _) = tiny_model(), examples(4)
    seen = []

    def recording(inputs):
        seen.append(inputs)
        return model(inputs)

    got = tta_probs(recording, x, range(4), jitter, n_aug=2, shift=1)
    fixed_inputs = seen[3:]  # after the plain pass and the 2 augmented copies
    assert len(fixed_inputs) == 5  # the plain pass is reused for the image itself
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    by_hand = [x.flip(-1), padded[..., 1:13, 0:12], padded[..., 1:13, 2:14],  # right, left
               padded[..., 0:12, 1:13], padded[..., 2:14, 1:13]]                 # down, up
    for a, b in zip(fixed_inputs, by_hand):
        assert torch.equal(a, b)
    mean = (softmax(model, x) + sum(softmax(model, v) for v in by_hand)) / 6
    torch.testing.assert_close(got["fixed"], mean)
    again = tta_probs(model, x, range(4), lambda inputs, draw: inputs * 0, n_aug=2, shift=1)
    torch.testing.assert_close(again["fixed"], got["fixed"])  # the augmentation plays no part


def test_draws_belong_to_the_example_not_the_batch():
    model, (x, _) = tiny_model(), examples(7)
    whole = tta_probs(model, x, range(7), jitter)["tta"]
    parts = torch.cat([tta_probs(model, x[:3], range(3), jitter)["tta"],
                       tta_probs(model, x[3:], range(3, 7), jitter)["tta"]])
    torch.testing.assert_close(parts, whole)
    torch.testing.assert_close(tta_probs(model, x, range(7), jitter)["tta"], whole)
    other_seed = tta_probs(model, x, range(7), jitter, seed=1)["tta"]
    assert not torch.allclose(other_seed, whole)
    draw = ExampleDraw(0, 1, [5, 2], torch.device("cpu"))
    first, second = draw(3), draw(3)
    assert first.shape == (2, 3) and not torch.equal(first, second)  # a fresh number per call
    assert torch.equal(ExampleDraw(0, 1, [2], torch.device("cpu"))(3)[0], first[1])


def by_hand_results(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    probs = tta_probs(model, x, range(len(y)), jitter)
    out = {}
    for kind, name in (("plain", "plain"), ("tta", "tta"), ("fixed", "tta_fixed")):
        p = probs[kind]
        out[f"{name}_accuracy"] = (p.argmax(-1) == y).double().mean().item()
        out[f"{name}_loss"] = -p[torch.arange(len(y)), y].log().double().mean().item()
    return out


def test_tta_accuracy_over_batches_counts_every_example_once():
    model, (x, y) = tiny_model(), examples()
    model.train()
    batches = [(x[i:i + 5], y[i:i + 5]) for i in range(0, N, 5)]
    got = tta_accuracy(fake_trainer(model), batches, jitter)
    want = by_hand_results(model.eval(), x, y)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-6), k
    assert len({round(got[f"{k}_accuracy"], 6) for k in ("plain", "tta", "tta_fixed")}) > 1
    model.train()
    tta_accuracy(fake_trainer(model), batches[:1], jitter)
    assert model.training  # left as it was found


def test_two_processes_agree_with_one(tmp_path: Path):
    """torchrun with 2 processes (gloo) and a real Trainer, against 1 process and the
    reference computed here: rank r evaluates examples r, r + 2, ... and the totals are
    all-reduced."""
    from conftest import launch

    results = {}
    for launcher in ("python", "torchrun"):
        out = tmp_path / f"{launcher}.json"
        launch(Path(__file__), [str(out), str(tmp_path / launcher)], launcher=launcher,
               timeout=120)
        results[launcher] = json.loads(out.read_text())
    one, two = results["python"], results["torchrun"]
    assert two.pop("world") == 2 and one.pop("world") == 1
    want = by_hand_results(tiny_model().eval(), *examples())
    for k in want:
        assert one[k] == pytest.approx(want[k], rel=1e-6), k
        assert two[k] == pytest.approx(want[k], rel=1e-6), k
    # The trainer's own evaluation sees the plain model on the same examples.
    assert two["plain_accuracy"] == pytest.approx(two["valid_accuracy"], rel=1e-9)
    assert two["plain_loss"] == pytest.approx(two["valid_loss"], rel=1e-5)


def main(out: str, output_dir: str) -> None:
    from toolkit.config import OptimConfig, ScheduleConfig, TrainConfig
    from toolkit.data.source import DeviceTensors
    from toolkit.trainer import Trainer

    x, y = examples()
    trainer = Trainer(tiny_model(), DeviceTensors(x, y), DeviceTensors(x, y, shuffle=False),
                      train=TrainConfig(output_dir=output_dir, epochs=1, batch_size=8,
                                        progress=False),
                      optim=OptimConfig(), schedule=ScheduleConfig())
    results = tta_accuracy(trainer, trainer.eval_data.eval_batches(), jitter)
    results.update(trainer.evaluate(), world=trainer.accelerator.num_processes)
    if trainer.is_main:
        Path(out).write_text(json.dumps(results))
    trainer.close()
    # The DDP model still holds the gloo process group; left to the interpreter's teardown,
    # gloo's threads free the last all-reduce's tensor without a Python to take the GIL
    # ("terminate called without an active exception", SIGABRT, in ~1 of 3 launches here
    # when a collective ends the run; pytorch/pytorch#179291). Free it while Python lives.
    del trainer
    gc.collect()


if __name__ == "__main__":
    main(*sys.argv[1:])
