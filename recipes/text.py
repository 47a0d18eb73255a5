"""A language model on your own text: AWD-LSTM or AWD-QRNN with the post's 1cycle and the
neural cache pointer, every flag and output of ``recipes/wt2.py``.

    python recipes/text.py --data-dir my_corpus                       # train/valid/test.txt
    python recipes/text.py --data-dir my_corpus --tokenizer sentencepiece --vocab-size 8000
    python recipes/text.py --data-dir hf:NAME --text-column body      # datasets, local cache
    toolkit evaluate runs/text --generate 50                          # with its own tokenizer

``--data-dir``: a folder with ``train.txt``, ``valid.txt`` and ``test.txt`` (UTF-8 raw text,
one paragraph or sentence per line), a ``datasets`` folder written by ``save_to_disk``, or
``hf:NAME`` (``load_dataset`` from its local cache: nothing downloads), with splits train,
validation (or valid) and test and the text in ``--text-column``.

``--tokenizer word``: whitespace-separated words, one ``<eos>`` per line, the vocabulary
every training word (AWD-LSTM's); ``sentencepiece``: a unigram model of ``--vocab-size``
pieces trained on the train split (deterministic, lossless). The tokenizer is saved in the
run folder (``tokenizer.json``, and ``tokenizer.model``, sentencepiece's own file), and a
resumed run, ``toolkit evaluate`` and ``--generate`` reuse it rather than building another.

Presets: wt2.py's (``cpu`` the default: a 2-layer 256-unit AWD-LSTM with an adaptive softmax
and Muon, sized for a small corpus on 2 cores; ``cpu-adam``; ``paper-lstm``,
``paper-lstm-adamw``, ``paper-qrnn``). The adaptive softmax's ``--cutoffs`` must fit the
vocabulary (``--cutoffs None``: a full softmax).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from recipes import wt2
from toolkit import recipe
from toolkit.errors import UserError
from toolkit.data.source import open_datasets
from toolkit.lm.data import DEFAULT_SP_VOCAB, SPLITS, Corpus, read_lines, tokenize
from toolkit.recipe import Run
from toolkit.run_folder import RunFolder


@dataclass
class Config(wt2.Config):
    data_dir: str | None = None
    """Folder with train.txt/valid.txt/test.txt, a datasets save_to_disk folder, or hf:NAME."""
    text_column: str = "text"
    """datasets: the column holding the text."""
    tokenizer: Literal["word", "sentencepiece"] = "word"
    """word: whitespace words (every training word); sentencepiece: a unigram model."""
    vocab_size: int | None = None
    """sentencepiece: pieces in the vocabulary (default 8000)."""

    def validate(self) -> None:
        super().validate()
        if self.data_dir is None:
            raise ValueError("--data-dir is required: a folder with train.txt, valid.txt and "
                             "test.txt, a datasets save_to_disk folder, or hf:NAME")
        if self.vocab_size is not None and self.tokenizer == "word":
            raise ValueError(f"--vocab-size {self.vocab_size} is for --tokenizer "
                             "sentencepiece; the word vocabulary is every training word")
        if self.vocab_size is not None and self.vocab_size < 8:
            raise ValueError(f"--vocab-size={self.vocab_size} must be >= 8")


def from_wt2(preset) -> Config:
    cfg = preset()
    out = Config(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(wt2.Config)})
    return dataclasses.replace(out, train=dataclasses.replace(
        cfg.train, output_dir=cfg.train.output_dir.replace("runs/wt2", "runs/text")))


PRESETS = {name: (lambda p=p: from_wt2(p)) for name, p in wt2.PRESETS.items()}


def read_text(data_dir: str, text_column: str) -> dict[str, list[str]]:
    """Lines of train, valid and test; one line for what is missing or unreadable."""
    splits = open_datasets(data_dir)
    if splits is not None:
        return _read_datasets(data_dir, splits, text_column)
    d = Path(data_dir)
    paths = {s: d / f"{s}.txt" for s in SPLITS}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        raise UserError(f"--data-dir {data_dir}: {', '.join(missing)} missing; expected "
                        "train.txt, valid.txt and test.txt, a datasets save_to_disk folder, "
                        "or hf:NAME")
    lines = {}
    for split, path in paths.items():
        try:
            lines[split] = read_lines(path)
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); convert it "
                            "to UTF-8 (iconv -f LATIN1 -t UTF-8, say)") from None
    return lines


def _read_datasets(data_dir: str, splits: dict, text_column: str) -> dict[str, list[str]]:
    lines = {}
    for split in SPLITS:
        if split not in splits:
            raise UserError(f"--data-dir {data_dir}: no {split} split (has "
                            f"{', '.join(splits)}; valid may be named validation)")
        found = splits[split]
        if text_column not in found.column_names:
            raise UserError(f"--data-dir {data_dir}: no column {text_column!r} (columns: "
                            f"{', '.join(found.column_names)}); name it with --text-column")
        lines[split] = list(found[text_column])
    return lines


def load_corpus(cfg: Config) -> Corpus:
    """The text tokenized with the run folder's saved tokenizer, or with a new one (trained
    on the train split) that is then saved there; an empty split is one line."""
    lines = read_text(cfg.data_dir, cfg.text_column)
    for split, text in lines.items():
        if not any(line.split() for line in text):
            raise UserError(f"--data-dir {cfg.data_dir}: the {split} split has no text")
    folder = RunFolder(cfg.train.output_dir)
    saved = folder.read_tokenizer()
    vocab_size = cfg.vocab_size or DEFAULT_SP_VOCAB if cfg.tokenizer == "sentencepiece" \
        else None
    if saved is not None:
        if saved["tokenizer"] != cfg.tokenizer or (
                vocab_size is not None and len(saved["vocab"]) != vocab_size):
            raise UserError(f"--output-dir {folder.path} holds the tokenizer of another run "
                            f"({saved['tokenizer']}, {len(saved['vocab'])} tokens); choose "
                            "another --output-dir")
        return Corpus.of(lines, saved["vocab"], saved["tokenizer"], saved["sp_model"])
    corpus = tokenize(lines, cfg.tokenizer, vocab_size)
    # Written only where none is: an existing run's tokenizer is never replaced (every rank
    # writes the same bytes, atomically).
    folder.write_tokenizer({"tokenizer": corpus.tokenizer, "vocab": corpus.vocab},
                           corpus.sp_model)
    return corpus


def build(cfg: Config) -> Run:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    corpus = load_corpus(cfg)
    if cfg.cutoffs and cfg.cutoffs[-1] >= corpus.vocab_size:
        raise UserError(f"--cutoffs {' '.join(map(str, cfg.cutoffs))}: the last must be below "
                        f"the vocabulary size {corpus.vocab_size}; pass smaller ones, or "
                        "--cutoffs None for a full softmax")
    return wt2.build_on(cfg, corpus, language_model)


def language_model(**args) -> torch.nn.Module:
    """wt2's model; defined here so that ``model.json`` names this recipe (whose tokenizer
    ``toolkit evaluate`` must use)."""
    return wt2.language_model(**args)


if __name__ == "__main__":
    recipe.main(PRESETS, build, __doc__)
