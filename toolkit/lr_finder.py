"""LR range test: an exponential lr sweep through the trainer's own step, then undone.

After fastai (``callback/schedule.py``): the loss is smoothed (exponential moving average,
debiased), the sweep stops once the smoothed loss passes ``stop_div`` (4) times its best,
and model, optimizer, RNG and position in the data are restored afterwards. The loss is
averaged over ranks before any decision, so every rank stops at the same step (per-rank
stops deadlock the next collective, fastai #2485).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from toolkit import checkpoint
from toolkit.distributed import all_reduce_sum
from toolkit.run_folder import RunFolder
from toolkit.schedule import set_lr


def _valley_index(loss: np.ndarray) -> int:
    """fastai v2's ``valley`` rule (fastai/fastai, fastai/callback/schedule.py, ``def valley``,
    commit 0a049e8a, lines ~205-223; the ESRI suggester): the index halfway down the longest
    strictly falling subsequence of the loss, ending at the first point where that longest
    one ends. fastai's arithmetic is kept exactly, off-by-one included: with ``run`` points
    ending at ``end`` it starts counting at ``end - run`` (one before the run) and adds
    ``int(run / 3) + int(run / 6)``, so "halfway" is one point early (its docs say "roughly
    2/3 through"; the formula gives 1/2)."""
    n = len(loss)
    run = np.ones(n, dtype=int)  # longest strictly falling subsequence ending at point i
    for i in range(1, n):
        higher = loss[:i] > loss[i]
        if higher.any():
            run[i] = run[:i][higher].max() + 1
    end = int(np.argmax(run))  # the first longest: fastai moves its end only on a strict gain
    start = end - int(run[end])
    third = (end - start) / 3
    # fastai gets -1 when the longest run starts at point 0 and has under 3 points (a curve
    # that never falls twice in a row), and Python's lrs[-1] then is the last, most diverged
    # lr. The first point is the answer that rule means there.
    return max(start + int(third) + int(third / 2), 0)


def suggestions(lrs: list[float], smoothed: list[float], skip_start: int | None = None,
                skip_end: int = 5) -> dict[str, float]:
    """Max lrs suggested by an LR range test's smoothed losses, fastai v2's default first.

    ``valley`` (fastai's default): halfway down the longest falling stretch of the curve;
    ``min_div10``: the lr of the lowest loss, divided by 10;
    ``steepest``: where the loss falls fastest per log lr, before its minimum.

    As in fastai's ``Learner.lr_find``, the rules see the smoothed losses cut at the first
    non-finite one (it diverged there) and without the first ``skip_start`` (default: a tenth
    of the points, fastai's ``num_it // 10``: averages of few batches) and the last
    ``skip_end`` (5) points. A curve left with under 3 points by that cut is used whole.
    ``valley`` and ``steepest`` need 3 points; no finite loss gives no suggestion.
    """
    if len(lrs) != len(smoothed):
        raise ValueError(f"suggestions needs one loss per lr, got {len(lrs)} lrs and "
                         f"{len(smoothed)} losses")
    lrs_a, sm = np.asarray(lrs, dtype=float), np.asarray(smoothed, dtype=float)
    bad = np.flatnonzero(~np.isfinite(sm))
    n = int(bad[0]) if len(bad) else len(sm)
    start = n // 10 if skip_start is None else skip_start
    if n - start - skip_end >= 3:
        lrs_a, sm = lrs_a[start:n - skip_end], sm[start:n - skip_end]
    else:
        lrs_a, sm = lrs_a[:n], sm[:n]
    if len(sm) == 0:
        return {}
    best = int(np.argmin(sm))
    out = {}
    if len(sm) >= 3:
        out["valley"] = float(lrs_a[_valley_index(sm)])
    # fastai's ``minimum``: the same rule on the same trimmed curve.
    out["min_div10"] = float(lrs_a[best] / 10)
    if len(sm) >= 3:
        # fastai's ``steep`` takes forward differences over the whole curve and returns the
        # left end of the steepest segment. Here: slopes only up to the minimum, because
        # past it a fall is the smoothed loss recovering from a spike inside the divergence
        # (its slope scales with the spike, not with learning); and central differences
        # (np.gradient), which put a symmetric descent's steepest point on the point itself
        # rather than half a step to its left. On a smooth curve whose steepest fall comes
        # before its minimum the two differ by at most one point. On digits (lr 1e-7..10)
        # fastai's rule picks 1.29, the decay after a loss spike of 203 at lr 0.61.
        end = max(best + 1, 3)
        slope = np.gradient(sm[:end], np.log(lrs_a[:end]))
        out["steepest"] = float(lrs_a[int(np.argmin(slope))])
    return out


def check_sweep(start_lr: float, end_lr: float, num_steps: int) -> None:
    if not 0 < start_lr < end_lr:
        raise ValueError(f"lr_find needs 0 < start_lr < end_lr, got {start_lr}, {end_lr}")
    if num_steps < 2:
        raise ValueError(f"num_steps={num_steps} must be >= 2")


def sweep(step: Callable[[float], float], start_lr: float = 1e-7, end_lr: float = 10.0,
          num_steps: int = 100, smooth: float = 0.98, stop_div: float = 4.0) -> dict:
    """Call ``step(lr)`` (one optimizer step at that max lr; returns the loss, the same on
    every rank) for exponentially growing lrs until ``end_lr`` or until the smoothed loss
    passes ``stop_div`` times its best. Returns lrs, raw and smoothed losses and
    :func:`suggestions`. :meth:`toolkit.trainer.Trainer.lr_find` runs it on a trainer."""
    check_sweep(start_lr, end_lr, num_steps)
    lrs, losses, smoothed = [], [], []
    avg, best = 0.0, math.inf
    for i in range(num_steps):
        lr = start_lr * (end_lr / start_lr) ** (i / (num_steps - 1))
        loss = step(lr)
        avg = smooth * avg + (1 - smooth) * loss
        value = avg / (1 - smooth ** (i + 1))
        lrs.append(lr), losses.append(loss), smoothed.append(value)
        if not math.isfinite(value) or value > stop_div * best:
            break
        best = min(best, value)
    # fastai trims a tenth of the planned sweep, also when it stopped early.
    return {"lrs": lrs, "losses": losses, "smoothed": smoothed,
            "suggestions": suggestions(lrs, smoothed, skip_start=num_steps // 10)}


def range_test(trainer, start_lr: float = 1e-7, end_lr: float = 10.0, num_steps: int = 100,
               smooth: float = 0.98, stop_div: float = 4.0) -> dict:
    """Sweep ``trainer``'s max lr from ``start_lr`` to ``end_lr`` through its own optimizer
    step (groups keep their lr ratios), write ``lr_find.json``/``.png``, and leave model,
    optimizer, schedule, RNG and step exactly as they were. Collective."""
    check_sweep(start_lr, end_lr, num_steps)
    acc, opt, folder = trainer.accelerator, trainer.scheduler.optimizer, trainer.folder
    # Snapshot through the strategy's checkpoint: the one way that also restores sharded
    # states, an engine's counters and the loss scaler. Collective, like the sweep.
    snapshot = folder.lr_find_state
    if acc.is_main_process:
        shutil.rmtree(snapshot, ignore_errors=True)
        snapshot.mkdir(parents=True)
    acc.wait_for_everyone()
    trainer.parallel.save(snapshot)
    saved_rng, saved_step = checkpoint.rng_state(), trainer.step
    top = max(trainer.scheduler.base_lrs)
    ratios = [b / top for b in trainer.scheduler.base_lrs]
    it = trainer.train_data.batches(trainer.step)
    trainer.model.train()

    def step(lr: float) -> float:
        for group, r in zip(opt.param_groups, ratios):
            set_lr(group, lr * r)
        loss = all_reduce_sum(trainer.optimizer_step(it, step_schedule=False).double())
        return loss.item() / acc.num_processes

    result = sweep(step, start_lr, end_lr, num_steps, smooth, stop_div)
    trainer.parallel.load(snapshot)
    checkpoint.set_rng_state(saved_rng)
    trainer.step = saved_step
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(snapshot)
        write(result, folder.path)
    acc.wait_for_everyone()
    return result


def write(result: dict, out: Path) -> None:
    """``out/lr_find.json`` and ``out/lr_find.png``."""
    folder = RunFolder(out)
    out.mkdir(parents=True, exist_ok=True)
    folder.write_lr_find(result)
    plot(result, folder.lr_find_plot)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result["lrs"], result["losses"], alpha=0.3, label="loss")
    ax.plot(result["lrs"], result["smoothed"], label="smoothed")
    # The first suggestion is the default one (valley): drawn solid, the others dashed.
    for k, (name, lr) in enumerate(result["suggestions"].items()):
        ax.axvline(lr, color=f"C{k + 2}", ls="-" if k == 0 else "--", label=f"{name} {lr:.2g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="loss", title="LR range test")
    finite = [v for v in result["smoothed"] if math.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) * 0.9, min(max(finite), 4 * min(finite)) * 1.1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
