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
from pathlib import Path

import numpy as np

from toolkit.checkpoint import rng_state, set_rng_state
from toolkit.config import write_json
from toolkit.distributed import all_reduce_sum
from toolkit.schedule import set_lr


def suggestions(lrs: list[float], smoothed: list[float]) -> dict[str, float]:
    """``steepest``: lr where the smoothed loss falls fastest (per log lr);
    ``min_div10``: lr of the lowest smoothed loss, divided by 10."""
    lrs_a, sm = np.asarray(lrs), np.asarray(smoothed)
    best = int(np.argmin(sm))
    out = {"min_div10": float(lrs_a[best] / 10)}
    if len(sm) >= 3:
        # Slopes up to the minimum only: past it the loss is diverging, not learning.
        end = max(best + 1, 3)
        slope = np.gradient(sm[:end], np.log(lrs_a[:end]))
        out["steepest"] = float(lrs_a[int(np.argmin(slope))])
    return out


def lr_find(trainer, start_lr: float = 1e-7, end_lr: float = 10.0, num_steps: int = 100,
            smooth: float = 0.98, stop_div: float = 4.0) -> dict:
    """Sweep the max lr from ``start_lr`` to ``end_lr``; write ``lr_find.json``/``.png``.

    Groups keep their lr ratios (discriminative lrs). Returns lrs, raw and smoothed losses
    and :func:`suggestions`. The trainer is left exactly as it was.
    """
    if not 0 < start_lr < end_lr:
        raise ValueError(f"lr_find needs 0 < start_lr < end_lr, got {start_lr}, {end_lr}")
    if num_steps < 2:
        raise ValueError(f"num_steps={num_steps} must be >= 2")
    acc, opt = trainer.accelerator, trainer.scheduler.optimizer
    # Snapshot through the checkpoint code: the one way that also restores ZeRO shards,
    # DeepSpeed's counters and the loss scaler. Collective, like the sweep.
    snapshot = Path(trainer.cfg.output_dir) / ".lr_find_state"
    if acc.is_main_process:
        shutil.rmtree(snapshot, ignore_errors=True)
        snapshot.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(snapshot))
    saved_rng, saved_step = rng_state(), trainer.step
    top = max(trainer.scheduler.base_lrs)
    ratios = [b / top for b in trainer.scheduler.base_lrs]
    it = trainer.train_batches()
    lrs, losses, smoothed = [], [], []
    avg, best = 0.0, math.inf
    trainer.model.train()
    for i in range(num_steps):
        lr = start_lr * (end_lr / start_lr) ** (i / (num_steps - 1))
        for group, r in zip(opt.param_groups, ratios):
            set_lr(group, lr * r)
        loss = all_reduce_sum(trainer.optimizer_step(it, step_schedule=False).double())
        loss = loss.item() / acc.num_processes
        avg = smooth * avg + (1 - smooth) * loss
        value = avg / (1 - smooth ** (i + 1))
        lrs.append(lr), losses.append(loss), smoothed.append(value)
        if not math.isfinite(value) or value > stop_div * best:
            break
        best = min(best, value)
    acc.load_state(str(snapshot))
    set_rng_state(saved_rng)
    trainer.step = saved_step
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(snapshot)
    finite = [i for i, v in enumerate(smoothed) if math.isfinite(v)]
    result = {"lrs": lrs, "losses": losses, "smoothed": smoothed,
              "suggestions": suggestions([lrs[i] for i in finite], [smoothed[i] for i in finite])}
    if acc.is_main_process:
        out = Path(trainer.cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "lr_find.json", result)
        plot(result, out / "lr_find.png")
    acc.wait_for_everyone()
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result["lrs"], result["losses"], alpha=0.3, label="loss")
    ax.plot(result["lrs"], result["smoothed"], label="smoothed")
    for (name, lr), color in zip(result["suggestions"].items(), ("C2", "C3")):
        ax.axvline(lr, color=color, ls="--", label=f"{name} {lr:.2g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="loss", title="LR range test")
    finite = [v for v in result["smoothed"] if math.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) * 0.9, min(max(finite), 4 * min(finite)) * 1.1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
