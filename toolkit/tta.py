"""Test-time augmentation: the post's (fastai 0.7's ``learn.TTA()``) and a deterministic
flip-and-shift variant, reported beside the plain accuracy.

fastai 0.7 (``old/fastai/learner.py``, ``Learner.TTA(self, n_aug=4, is_test=False)``)::

    preds1,targs = predict_with_targs(self.model, dl1)
    preds1 = [preds1]*math.ceil(n_aug/4)
    preds2 = [predict_with_targs(self.model, dl2)[0] for i in tqdm(range(n_aug), leave=False)]
    return np.stack(preds1+preds2), targs

``dl1`` is the validation set with the validation transform, ``dl2`` (``aug_dl``) the same
images with the *training* transforms, and the model ends in ``LogSoftmax``; the post's
``fit_stanford_cars.py`` then takes ``probs = np.mean(np.exp(preds), 0)`` (the mean of the
probabilities of the plain pass, counted ``ceil(n_aug / 4)`` times, and the ``n_aug``
augmented ones), its accuracy and ``nll(log(probs))``. :func:`tta_accuracy` computes the
same from logits (softmax = exp of log-softmax), with the augmentation applied on the device
to the evaluation batch (``augment(x, draw)``, e.g. :class:`~toolkit.data.cars.SideOn`).

Reproducible and independent of the number of processes and of the batch size: the numbers
of augmented copy ``k`` of example ``i`` come from a generator seeded by (seed, k, i)
(:class:`ExampleDraw`). ``i`` is the example's position in the evaluation set, known from
the order every kind of data gives ``eval_batches()`` (:class:`~toolkit.sampler.ShardSampler`):
rank ``r`` of ``W`` reads examples ``r, r + W, r + 2W, ...`` in order.

The deterministic variant averages the image, its horizontal flip and its translations by
``shift`` pixels left, right, up and down (reflected borders): no randomness at all.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device

from toolkit.data.source import mix_seed
from toolkit.distributed import mean_of_sums
from toolkit.sampler import eval_shard

Augment = Callable[[torch.Tensor, Callable[..., torch.Tensor]], torch.Tensor]
"""``augment(x, draw)``: a batch of inputs, randomly changed with numbers from ``draw``."""


class ExampleDraw:
    """Uniform numbers in [0, 1) for a batch of examples, each example's from its own
    generator seeded by (``seed``, ``view``, its index ``indices[j]``, call number): the same
    numbers for an example whatever batch or process it is evaluated in.

    ``draw(*shape)`` returns ``[len(indices), *shape]`` on ``device``; the same interface as
    :class:`~toolkit.data.source.Draw`."""

    def __init__(self, seed: int, view: int, indices: Iterable[int], device: torch.device):
        self.seed, self.view, self.indices = seed, view, [int(i) for i in indices]
        self.device, self.calls = device, 0

    def __call__(self, *shape: int) -> torch.Tensor:
        gens = (torch.Generator().manual_seed(mix_seed(self.seed, self.view, i, self.calls))
                for i in self.indices)
        self.calls += 1
        return torch.stack([torch.rand(shape, generator=g) for g in gens]).to(self.device)


def flip_shift_views(x: torch.Tensor, shift: int = 8, flip: bool = True) -> list[torch.Tensor]:
    """The deterministic variant's views of ``x`` ``[B, C, H, W]``: ``x``, its horizontal flip
    (with ``flip``; not for digits, say), and ``x`` moved by ``shift`` pixels right, left,
    down and up, the uncovered border filled by reflection
    (``out[..., i, j] = x[..., i - dy, j - dx]`` inside)."""
    h, w = x.shape[-2:]
    if not 0 <= shift < min(h, w):
        raise ValueError(f"shift={shift} must be in [0, {min(h, w)}) for {h}x{w} images")
    views = [x, x.flip(-1)] if flip else [x]
    if shift:
        padded = F.pad(x, (shift,) * 4, mode="reflect")

        def moved(dy: int, dx: int) -> torch.Tensor:
            return padded[..., shift - dy:shift - dy + h, shift - dx:shift - dx + w]

        views += [moved(0, shift), moved(0, -shift), moved(shift, 0), moved(-shift, 0)]
    return views


def tta_probs(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
              indices: Iterable[int], augment: Augment, n_aug: int = 4, *, seed: int = 0,
              shift: int = 8, flip: bool = True) -> dict[str, torch.Tensor]:
    """Class probabilities of a batch ``x`` (examples ``indices`` of the evaluation set):
    ``plain``, ``tta`` (fastai's: the plain pass weighted ``ceil(n_aug / 4)`` and ``n_aug``
    augmented copies, averaged) and ``fixed`` (the mean over :func:`flip_shift_views`)."""
    if n_aug < 1:
        raise ValueError(f"n_aug={n_aug} must be >= 1")
    indices = list(indices)

    def probs(inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs).float().softmax(-1)

    plain = probs(x)
    weight = math.ceil(n_aug / 4)
    total = plain * weight
    for k in range(1, n_aug + 1):
        total = total + probs(augment(x, ExampleDraw(seed, k, indices, x.device)))
    views = flip_shift_views(x, shift, flip)
    fixed = plain + sum(probs(v) for v in views[1:])
    return {"plain": plain, "tta": total / (weight + n_aug), "fixed": fixed / len(views)}


@torch.no_grad()
def tta_accuracy(trainer, eval_batches: Iterable, augment: Augment, n_aug: int = 4, *,
                 seed: int = 0, shift: int = 8, flip: bool = True) -> dict[str, float]:
    """Accuracy and loss (NLL of the averaged probabilities) of ``trainer``'s model over the
    evaluation set, plain, with the post's TTA and with the deterministic flip/shift variant.
    ``eval_batches`` is this rank's ``(inputs, targets)`` batches, in the order of
    ``eval_batches()`` (e.g. ``trainer.eval_data.eval_batches()``). Collective: every rank
    calls it, and all get the totals over all ranks.

    A recipe's final evaluation (:class:`~toolkit.recipe.Run`)::

        final_evaluation=lambda: tta_accuracy(trainer, trainer.eval_data.eval_batches(), SideOn())
    """
    acc, model = trainer.accelerator, trainer.model
    world, rank = acc.num_processes, acc.process_index
    was_training = model.training
    model.eval()
    names = {"plain": "plain", "tta": "tta", "fixed": "tta_fixed"}
    sums = {"count": 0.0, **{f"{n}_{m}": 0.0 for n in names.values()
                             for m in ("accuracy", "loss")}}
    seen = 0
    try:
        for batch in eval_batches:
            x, y = send_to_device(tuple(batch[:2]), acc.device)
            # Each example's index in the whole set, whichever rank evaluates it.
            indices = list(eval_shard(sys.maxsize, world, rank)[seen:seen + len(y)])
            out = tta_probs(model, x, indices, augment, n_aug, seed=seed, shift=shift,
                            flip=flip)
            for kind, name in names.items():
                p = out[kind]
                target = p.gather(1, y.view(-1, 1)).squeeze(1)
                sums[f"{name}_accuracy"] += (p.argmax(-1) == y).sum().item()
                nll = -target.clamp_min(torch.finfo(p.dtype).tiny).log()
                sums[f"{name}_loss"] += nll.double().sum().item()
            sums["count"] += len(y)
            seen += len(y)
    finally:
        model.train(was_training)
    return mean_of_sums(sums)


def tta_evaluation(trainer, augment: Augment, *, seed: int, shift: int,
                   flip: bool = True) -> Callable[[], dict[str, float]]:
    """A recipe's final evaluation (:class:`~toolkit.recipe.Run`): :func:`tta_accuracy`
    over ``trainer``'s evaluation data."""
    return lambda: tta_accuracy(trainer, trainer.eval_data.eval_batches(), augment,
                                seed=seed, shift=shift, flip=flip)


def accuracy_line(results: dict, split: str = "test") -> str:
    """The image recipes' last line: the evaluated ``split``'s accuracy, with TTA when the
    results have it."""
    line = f"{split} accuracy {results['valid_accuracy']:.4f}"
    if "tta_accuracy" in results:
        line += (f", with TTA {results['tta_accuracy']:.4f} (fixed views "
                 f"{results['tta_fixed_accuracy']:.4f})")
    return line + f" after {results['step']} steps ({results['wall_time_s']} s)"
