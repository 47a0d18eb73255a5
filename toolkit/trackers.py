"""Experiment trackers (``--trackers``): where a run's scalars go besides ``metrics.jsonl``.

    tensorboard  RUN/tensorboard/ (the default)
    wandb        Weights & Biases: project ``--tracker-project``, run named after the run
                 folder, its files under RUN/wandb/ (``WANDB_MODE=offline`` works offline)
    mlflow       MLflow: experiment ``--tracker-project`` at ``MLFLOW_TRACKING_URI``
    csv          RUN/metrics.csv, one line per value: step,name,value (tidy; pandas'
                 ``pivot_table(index="step", columns="name")`` makes it wide)

Each receives every row that ``metrics.jsonl`` gets (lr, beta1 or momentum, losses,
evaluation metrics, ``train_seconds``, the clock of time to target); W&B and MLflow also
receive the resolved config as the run's parameters (flattened: ``optim.lr``; those of its
first start, as MLflow's cannot change) and the provenance as tags (git commit, command).
Only the main process tracks.

A resumed run continues the same W&B and MLflow run: their ids are kept in the run folder's
``trackers.json`` and read from the folder of the checkpoint that is resumed. The resumed run
logs the steps after its checkpoint again (exact resume: the same values); W&B drops steps it
has seen, MLflow keeps both points. A tracker whose package is missing is a config error; one
that cannot start (no server, no login) is one line before the first step.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from accelerate.tracking import GeneralTracker, MLflowTracker, TensorBoardTracker, WandBTracker

from toolkit.config import Tracker
from toolkit.errors import UserError
from toolkit.run_folder import RunFolder, cut_torn_line


class CSVTracker(GeneralTracker):
    """RUN/metrics.csv: ``step,name,value`` per logged number, appended (a resumed run logs
    its steps again, like ``metrics.jsonl``)."""

    name, requires_logging_directory, main_process_only = "csv", False, True

    def __init__(self, path: Path):
        super().__init__()
        self.path, self.file = Path(path), None

    @property
    def tracker(self):
        return self.file

    def start(self):
        cut_torn_line(self.path)
        new = not self.path.is_file() or self.path.stat().st_size == 0
        self.file = open(self.path, "a", newline="")
        self.writer = csv.writer(self.file)
        if new:
            self.writer.writerow(["step", "name", "value"])
            self.file.flush()

    def store_init_configuration(self, values: dict):
        pass  # config.json holds it

    def log(self, values: dict, step: int | None = None, **kwargs):
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.writerow([step, k, v])
        self.file.flush()

    def finish(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def flatten(config: dict, prefix: str = "") -> dict:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``; values other than numbers, strings
    and bools become strings (what W&B and MLflow show as parameters)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def start(names: tuple[Tracker, ...], folder: RunFolder, resumed_from: RunFolder | None,
          project: str | None, config: dict | None, commit: str | None) -> list[GeneralTracker]:
    """Start the trackers ``names`` of the run in ``folder`` (main process), continuing the
    tracked runs of ``resumed_from`` (the resumed checkpoint's run folder); their ids go to
    ``folder``'s trackers.json. A tracker that fails to start is a :class:`UserError`."""
    ids = (resumed_from or folder).read_tracker_ids()
    out = folder.path
    project = project or Path(sys.argv[0]).stem or "toolkit"
    command = " ".join(sys.argv)
    tags = {"git_commit": commit or "unknown", "command": command}
    params = flatten(config or {})
    started = []
    for name in names:
        if name == "tensorboard":
            tracker = TensorBoardTracker("tensorboard", out)
        elif name == "csv":
            tracker = CSVTracker(folder.metrics_csv)
        elif name == "wandb":
            tracker = WandBTracker(project, id=ids.get("wandb"), resume="allow", dir=str(out),
                                   name=out.name, notes=command,
                                   tags=[f"commit:{(commit or 'unknown')[:12]}"])
        else:
            tracker = MLflowTracker(project, run_id=ids.get("mlflow"), tags=tags,
                                    run_name=out.name)
        try:
            tracker.start()
            if name in ("wandb", "mlflow") and name not in ids:  # a continued run has them
                tracker.store_init_configuration(params)
        except Exception as e:  # noqa: BLE001 - any library's failure is the user's one line
            for t in started:
                t.finish()
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"--trackers {name} could not start: {first}") from None
        if name == "wandb":
            ids["wandb"] = tracker.run.id
        elif name == "mlflow":
            ids["mlflow"] = tracker.active_run.info.run_id
        started.append(tracker)
    if ids:
        folder.write_tracker_ids(ids)
    return started
