"""A run folder (a run's ``--output-dir``): the one place that names and reads its files.

    config.json        the resolved recipe config, written when a run starts fresh
    metrics.jsonl      one JSON row per logged step (a resumed run logs its steps again)
    checkpoints/       step_N folders (:mod:`toolkit.checkpoint`)
    results.json       written once, when the run finished: the folder's proof of that
    model.safetensors  the final fp32 weights, and model.json, the function that builds them
    lr_find.json/.png  an LR range test (``--lr-find``)
    provenance.json    what made each start of the run, code-N.diff its uncommitted code
    eval.json          ``toolkit evaluate``'s scores; metrics.png ``toolkit plot``'s curves
    metrics.csv        ``--trackers csv``; trackers.json the W&B and MLflow run ids
    tokenizer.json     a language model's tokenizer (and tokenizer.model, sentencepiece's)
    .lock              held by the live run (:func:`toolkit.lifecycle.claim`)

Whole files are written atomically (:mod:`toolkit.atomic`): a reader sees a file or none.
``metrics.jsonl`` (and ``metrics.csv``) are appended to instead, so a crash can leave a last
row torn: a row counts once its newline is written, and :func:`cut_torn_line` cuts the rest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from toolkit.atomic import write_atomic
from toolkit.errors import UserError

FINISHED, INTERRUPTED, NEW = "finished", "interrupted", "new"


@dataclass(frozen=True)
class RunFolder:
    """The files of the run folder at ``path``: their paths, and how each is written and read."""

    path: Path

    CONFIG, METRICS, RESULTS = "config.json", "metrics.jsonl", "results.json"
    CHECKPOINTS = "checkpoints"
    WEIGHTS, MODEL_SPEC = "model.safetensors", "model.json"
    LR_FIND, LR_FIND_PLOT, LR_FIND_STATE = "lr_find.json", "lr_find.png", ".lr_find_state"
    PROVENANCE, EVAL, METRICS_PLOT, LOCK = "provenance.json", "eval.json", "metrics.png", ".lock"
    METRICS_CSV, TRACKER_IDS = "metrics.csv", "trackers.json"
    TOKENIZER, TOKENIZER_MODEL = "tokenizer.json", "tokenizer.model"

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))  # a str too: a command line's

    config = property(lambda self: self.path / self.CONFIG)
    metrics = property(lambda self: self.path / self.METRICS)
    results = property(lambda self: self.path / self.RESULTS)
    checkpoints = property(lambda self: self.path / self.CHECKPOINTS)
    weights = property(lambda self: self.path / self.WEIGHTS)
    model_spec = property(lambda self: self.path / self.MODEL_SPEC)
    lr_find = property(lambda self: self.path / self.LR_FIND)
    lr_find_plot = property(lambda self: self.path / self.LR_FIND_PLOT)
    lr_find_state = property(lambda self: self.path / self.LR_FIND_STATE)
    provenance = property(lambda self: self.path / self.PROVENANCE)
    eval = property(lambda self: self.path / self.EVAL)
    metrics_plot = property(lambda self: self.path / self.METRICS_PLOT)
    lock = property(lambda self: self.path / self.LOCK)
    metrics_csv = property(lambda self: self.path / self.METRICS_CSV)
    tracker_ids = property(lambda self: self.path / self.TRACKER_IDS)

    def code_diff(self, start: int) -> Path:
        """The uncommitted changes of the code at start ``start`` (0: the first, then resumes)."""
        return self.path / f"code-{start}.diff"

    # ---- whole JSON files: None while absent ------------------------------------------
    def write_config(self, config: dict) -> None:
        _write_json(self.config, config)

    def read_config(self) -> dict | None:
        return _read_json(self.config)

    def write_results(self, results: dict) -> None:
        _write_json(self.results, results)

    def read_results(self) -> dict | None:
        return _read_json(self.results)

    def write_model_spec(self, spec: dict) -> None:
        _write_json(self.model_spec, spec)

    def read_model_spec(self) -> dict | None:
        return _read_json(self.model_spec)

    def write_lr_find(self, result: dict) -> None:
        _write_json(self.lr_find, result)

    def read_lr_find(self) -> dict | None:
        return _read_json(self.lr_find)

    def write_provenance(self, starts: list[dict]) -> None:
        write_atomic(self.provenance, json.dumps(starts, indent=2) + "\n")

    def read_provenance(self) -> list[dict]:
        return _read_json(self.provenance) or []

    def write_tokenizer(self, meta: dict, sp_model: bytes | None) -> None:
        """``meta`` (``tokenizer``, ``vocab``) and the sentencepiece model, unless the folder
        holds a tokenizer already (never replaced: it belongs to the run there)."""
        if (self.path / self.TOKENIZER).is_file():
            return
        self.path.mkdir(parents=True, exist_ok=True)
        if sp_model is not None:
            write_atomic(self.path / self.TOKENIZER_MODEL, sp_model)
        _write_json(self.path / self.TOKENIZER, meta)

    def read_tokenizer(self) -> dict | None:
        """``tokenizer``, ``vocab`` and ``sp_model`` (bytes or None); None when absent."""
        meta = _read_json(self.path / self.TOKENIZER)
        if meta is None:
            return None
        model = self.path / self.TOKENIZER_MODEL
        return {**meta, "sp_model": model.read_bytes() if meta["tokenizer"] != "word" else None}

    def write_tracker_ids(self, ids: dict) -> None:
        _write_json(self.tracker_ids, ids)

    def read_tracker_ids(self) -> dict:
        return _read_json(self.tracker_ids) or {}

    # ---- the final weights ------------------------------------------------------------
    def write_weights(self, state: dict) -> None:
        """``state`` (name -> tensor) as one safetensors file, atomically."""
        from safetensors.torch import save  # here: it imports torch, which reports never need

        write_atomic(self.weights, save({k: v.contiguous() for k, v in state.items()}))

    def read_weights(self) -> dict:
        from safetensors.torch import load_file

        return load_file(self.weights)

    # ---- metrics.jsonl ----------------------------------------------------------------
    def append_metrics(self, row: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict]:
        """The rows, sorted by step; a step logged twice (a resumed run) keeps its last row.
        A last row without its newline (torn by a crash, or being written) is left out."""
        if not self.metrics.is_file():
            return []
        rows = {}
        for i, line in enumerate(self.metrics.read_text().split("\n")[:-1]):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise UserError(f"{self.metrics} line {i + 1} is not JSON ({e})") from None
                rows[(row["step"], tuple(sorted(row)))] = row
        return sorted(rows.values(), key=lambda r: r["step"])

    def repair_metrics(self) -> None:
        """Cut a row that a crash left half-written (the resumed run logs that step again),
        so that every line stays one JSON object."""
        cut_torn_line(self.metrics)

    # ---- what the folder holds --------------------------------------------------------
    def checkpoint_steps(self) -> list[int]:
        """The steps of its committed checkpoints, oldest first."""
        from toolkit import checkpoint  # here: it imports torch, which reports never need

        return [step for step, _ in checkpoint.list_checkpoints(self.checkpoints)]

    def status(self) -> str:
        """:data:`FINISHED` (results.json written), :data:`INTERRUPTED` (it logged a row or
        committed a checkpoint: ``--resume auto`` goes on) or :data:`NEW` (nothing to go
        on from: no folder, or a run that ended before its first row and checkpoint)."""
        if self.results.is_file():
            return FINISHED
        # metrics.jsonl first: it spares a report of unfinished runs the torch import.
        return INTERRUPTED if self.metrics.is_file() or self.checkpoint_steps() else NEW

    def holds_run(self) -> bool:
        """Whether a run was here: starting another one without ``--resume`` would mix them."""
        return self.status() != NEW


def cut_torn_line(path: Path) -> None:
    """Cut the end of an appended file after its last newline (a row a crash left torn)."""
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)


def _write_json(path: Path, obj) -> None:
    from toolkit.config import write_json  # here: it imports torch, which reports never need

    write_json(path, obj)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
