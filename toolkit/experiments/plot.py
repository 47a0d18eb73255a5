"""Plots of a run from its ``metrics.jsonl``: train/valid loss, lr and beta1 per step."""

from __future__ import annotations

from pathlib import Path

from toolkit.errors import UserError
from toolkit.run_folder import RunFolder


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write loss / lr / beta1 panels to ``out`` (default ``run_dir/metrics.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = RunFolder(run_dir)
    if not folder.metrics.is_file():
        raise UserError(f"{folder.metrics} does not exist: RUN_DIR must be a run's --output-dir")
    rows = folder.read_metrics()
    series = lambda key: ([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r])
    mom = "beta1" if any("beta1" in r for r in rows) else "momentum"
    valid = sorted({k for r in rows for k in r if k.startswith("valid_")})
    fig, axes = plt.subplots(1, 3 + bool(valid), figsize=(5 * (3 + bool(valid)), 3.6))
    axes[0].plot(*series("train_loss"), label="train")
    if "valid_loss" in valid:
        axes[0].plot(*series("valid_loss"), "o-", label="valid")
    axes[0].set(title="loss", xlabel="step")
    axes[0].legend()
    axes[1].plot(*series("lr"))
    axes[1].set(title="learning rate", xlabel="step")
    axes[2].plot(*series(mom))
    axes[2].set(title=mom, xlabel="step")
    if valid:
        for key in valid:
            if key != "valid_loss":
                axes[3].plot(*series(key), "o-", label=key)
        axes[3].set(title="eval metrics", xlabel="step")
        axes[3].legend()
    fig.tight_layout()
    out = Path(out) if out else folder.metrics_plot
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
