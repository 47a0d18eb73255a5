"""WikiText-2 as token-id streams, and AWD-LSTM's BPTT batching of such a stream.

Loading: a local folder (``--data-dir``) with ``wiki.{train,valid,test}.tokens`` (the
official zip), ``{train,valid,test}.txt`` (pytorch/examples, salesforce/awd-lstm-lm) or
``wiki.{split}.raw``; without one, Hugging Face ``Salesforce/wikitext`` (train/validation/test,
one line per row in a ``text`` column). Both give the same lines, and the same ids.

Tokens, as in AWD-LSTM's ``data.py``: every line is split on whitespace and ends with one
``<eos>``, empty lines included. On the tokenized v1 files: 2,088,628 / 217,646 / 245,569
tokens and a 33,278-word vocabulary (``<unk>`` is a word of WikiText, so valid and test have
no out-of-vocabulary words). Or ``tokenizer="sentencepiece"``: a unigram model trained on the
train split, deterministic (one thread, no shuffling) and lossless (byte fallback, no
normalization), so ``decode`` gives back each line with its whitespace collapsed.

The ids are cached on disk, keyed by the content of the text, so only the first run
tokenizes. :class:`BPTTStream` batches a stream for training (AWD's variable length) or
evaluation (fixed length), sharded by columns over processes.
"""

from __future__ import annotations

import copy
import hashlib
import io
import itertools
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from toolkit.atomic import write_atomic
from toolkit.distributed import micro_batch
from toolkit.sampler import micro_part
from toolkit.errors import UserError

SPLITS = ("train", "valid", "test")
EOS, UNK = "<eos>", "<unk>"
# Checked in this order; the first pattern present for all three splits wins.
FILE_PATTERNS = ("wiki.{}.tokens", "{}.txt", "wiki.{}.raw")
HF_REPO = "Salesforce/wikitext"  # the current hub id of the legacy "wikitext"
HF_CONFIGS = ("wikitext-2-v1", "wikitext-2-raw-v1")
HF_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
TOKENIZERS = ("word", "sentencepiece")
DEFAULT_SP_VOCAB = 8000
CACHE_VERSION = 1  # bump when tokenization changes, so old caches are not reused


# ---- text -------------------------------------------------------------------------------
def read_dir(data_dir: str | Path) -> dict[str, list[str]]:
    """Lines of each split from a local WikiText-2 folder."""
    folder = Path(data_dir).expanduser()
    expected = " or ".join("/".join(p.format(s) for s in SPLITS) for p in FILE_PATTERNS)
    if not folder.is_dir():
        raise UserError(f"--data-dir {folder} is not a folder; give the folder holding {expected}")
    for pattern in FILE_PATTERNS:
        paths = [folder / pattern.format(s) for s in SPLITS]
        if all(p.is_file() for p in paths):
            return {s: read_lines(p) for s, p in zip(SPLITS, paths)}
    raise UserError(f"--data-dir {folder} holds no WikiText-2: expected {expected}")


def read_lines(path: Path) -> list[str]:
    # Text-mode lines, as AWD-LSTM reads the files, so line (and <eos>) counts agree with it.
    with path.open(encoding="utf-8") as f:
        return f.readlines()


def lines_from_hf(dataset) -> dict[str, list[str]]:
    """Lines of each split from a ``datasets.DatasetDict`` of WikiText (``text`` column)."""
    missing = [h for h in HF_SPLITS.values() if h not in dataset]
    if missing:
        raise UserError(f"the WikiText dataset lacks splits {missing}; "
                        "expected train/validation/test")
    return {s: list(dataset[h]["text"]) for s, h in HF_SPLITS.items()}


def read_hf(config: str = "wikitext-2-v1") -> dict[str, list[str]]:
    """Lines of each split from the Hugging Face hub (or its local cache)."""
    if config not in HF_CONFIGS:
        raise UserError(f"unknown WikiText-2 config {config!r}; choose one of {HF_CONFIGS}")
    try:
        from datasets import load_dataset  # imported here: it takes seconds

        dataset = load_dataset(HF_REPO, config)
    except Exception as e:  # offline, hub down, no cache: all end the same way
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"WikiText-2 is not available from Hugging Face ({reason}); pass "
                        "--data-dir FOLDER holding wiki.{train,valid,test}.tokens or "
                        "{train,valid,test}.txt") from e
    return lines_from_hf(dataset)


def words(lines: Iterable[str]) -> Iterator[str]:
    """AWD-LSTM's tokens: whitespace-separated words, one ``<eos>`` per line (empty ones too)."""
    for line in lines:
        yield from line.split()
        yield EOS


# ---- tokenized corpus -------------------------------------------------------------------
@dataclass
class Corpus:
    """Token-id streams of the three splits and the vocabulary that maps ids to tokens."""

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    vocab: list[str]
    """Token of each id: a word, or a sentencepiece piece."""
    tokenizer: str = "word"
    sp_model: bytes | None = None
    """The serialized sentencepiece model (``tokenizer="sentencepiece"``)."""
    _sp: object = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def of(cls, lines: dict[str, list[str]], vocab: list[str] | None, tokenizer: str = "word",
           sp_model: bytes | None = None) -> Corpus:
        """The three splits of ``lines`` encoded with ``vocab`` (None: the sentencepiece
        model's pieces)."""
        empty = torch.empty(0, dtype=torch.long)
        corpus = cls(empty, empty, empty, vocab or [], tokenizer, sp_model)
        if vocab is None:
            sp = corpus.processor()
            corpus.vocab = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        corpus.train, corpus.valid, corpus.test = (corpus.encode(lines[s]) for s in SPLITS)
        return corpus

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def eos_id(self) -> int:
        return self.vocab.index(EOS)

    def processor(self):
        """The sentencepiece processor, built once from ``sp_model``."""
        if self._sp is None:
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_proto=self.sp_model)
        return self._sp

    def encode(self, lines: Iterable[str]) -> torch.Tensor:
        """One stream of ids for ``lines``, each line ending with ``<eos>``."""
        if self.tokenizer == "word":
            index = {w: i for i, w in enumerate(self.vocab)}
            unk = index[UNK]
            return torch.tensor([index.get(w, unk) for w in words(lines)], dtype=torch.long)
        eos = self.eos_id
        pieces = self.processor().encode([" ".join(line.split()) for line in lines])
        return torch.tensor(list(itertools.chain.from_iterable(p + [eos] for p in pieces)),
                            dtype=torch.long)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ``ids``: words joined by spaces, ``"\\n"`` for each ``<eos>``."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        eos, out, line = self.eos_id, [], []
        for i in ids + [None]:
            if i is None or i == eos:
                if self.tokenizer == "word":
                    out.append(" ".join(self.vocab[j] for j in line))
                else:
                    out.append(self.processor().decode(line))
                out.append("\n" if i is not None else "")
                line = []
            else:
                line.append(i)
        return "".join(out)


def word_vocab(lines: Iterable[str]) -> list[str]:
    """Train words, most frequent first, ties in order of first appearance; ``<unk>`` ensured.

    Frequency order lets an adaptive softmax take its head cluster as the first ids.
    ``Counter`` keeps first-appearance order and ``sorted`` is stable, hence the tie rule.
    """
    counts = Counter(words(lines))
    vocab = sorted(counts, key=lambda w: -counts[w])
    if UNK not in counts:  # the raw version has no <unk>, but valid/test words may be unseen
        vocab.append(UNK)
    return vocab


def train_sentencepiece(lines: Iterable[str], vocab_size: int) -> bytes:
    """A unigram sentencepiece model of ``lines``, serialized; the same bytes on every run.

    One thread and no shuffling: with two threads the trained model differs between runs.
    Byte fallback and the identity normalization make encoding lossless (no NFKC rewrite,
    no unknown characters); WikiText's ``<unk>`` stays one piece; ``<eos>`` ends lines.
    """
    import sentencepiece as spm

    text = [t for t in (" ".join(line.split()) for line in lines) if t]
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(text), model_writer=model, vocab_size=vocab_size,
            model_type="unigram", byte_fallback=True, normalization_rule_name="identity",
            user_defined_symbols=[UNK], unk_piece="<sp_unk>", unk_id=0, eos_id=1,
            eos_piece=EOS, bos_id=-1, pad_id=-1, max_sentence_length=1 << 16,
            num_threads=1, shuffle_input_sentence=False, minloglevel=2)
    except RuntimeError as e:  # e.g. vocab_size too small for the characters, or too large
        raise UserError(f"sentencepiece cannot train vocab_size={vocab_size}: "
                        f"{str(e).splitlines()[0][:200]}") from e
    return model.getvalue()


def tokenize(lines: dict[str, list[str]], tokenizer: str = "word",
             vocab_size: int | None = None) -> Corpus:
    """Build the vocabulary from ``lines["train"]`` and encode the three splits with it."""
    if tokenizer == "word":
        return Corpus.of(lines, word_vocab(lines["train"]))
    return Corpus.of(lines, None, tokenizer, train_sentencepiece(lines["train"], vocab_size))


# ---- cache ------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$TOOLKIT_CACHE`` or ``~/.cache/toolkit``."""
    return Path(os.environ.get("TOOLKIT_CACHE", "~/.cache/toolkit")).expanduser()


def fingerprint(lines: dict[str, list[str]], tokenizer: str, vocab_size: int | None) -> str:
    """Hash of the text and the tokenizer settings: a copied or touched file still hits."""
    h = hashlib.sha256(f"{CACHE_VERSION}|{tokenizer}|{vocab_size}".encode())
    for s in SPLITS:
        h.update(f"|{s}|{len(lines[s])}|".encode())
        for line in lines[s]:
            b = line.encode()
            h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


def load_wikitext2(data_dir: str | Path | None = None, *, tokenizer: str = "word",
                   vocab_size: int | None = None, cache_dir: str | Path | None = None,
                   use_cache: bool = True, hf_config: str = "wikitext-2-v1") -> Corpus:
    """WikiText-2 as id streams, from ``data_dir`` or else from Hugging Face, cached.

    ``vocab_size`` is for ``tokenizer="sentencepiece"`` (default 8,000); the word vocabulary
    is every train word (33,278). The cache file is
    ``<cache_dir>/wikitext2-<word|spN>-<sha256 of text and settings>.pt``.
    """
    if tokenizer not in TOKENIZERS:
        raise UserError(f"unknown tokenizer {tokenizer!r}; choose one of {TOKENIZERS}")
    if tokenizer == "word" and vocab_size is not None:
        raise UserError("vocab_size is for tokenizer='sentencepiece'; the word vocabulary is "
                        "every training word")
    if tokenizer == "sentencepiece" and vocab_size is None:
        vocab_size = DEFAULT_SP_VOCAB
    lines = read_dir(data_dir) if data_dir is not None else read_hf(hf_config)
    if not use_cache:
        return tokenize(lines, tokenizer, vocab_size)
    key = fingerprint(lines, tokenizer, vocab_size)
    tag = "word" if tokenizer == "word" else f"sp{vocab_size}"
    path = Path(cache_dir or default_cache_dir()) / f"wikitext2-{tag}-{key[:16]}.pt"
    if path.exists():
        try:
            state = torch.load(path, weights_only=True)
        except Exception as e:
            raise UserError(f"token cache {path} is unreadable ({type(e).__name__}); "
                            "delete it to tokenize again") from e
        if state.get("key") != key:
            raise UserError(f"token cache {path} belongs to other text; delete it")
        return Corpus(state["train"], state["valid"], state["test"], state["vocab"],
                      state["tokenizer"], state["sp_model"])
    corpus = tokenize(lines, tokenizer, vocab_size)
    state = {"key": key, "train": corpus.train, "valid": corpus.valid, "test": corpus.test,
             "vocab": corpus.vocab, "tokenizer": tokenizer, "sp_model": corpus.sp_model}
    path.parent.mkdir(parents=True, exist_ok=True)
    # Several ranks may race here: each rename is whole, and all write the same bytes.
    write_atomic(path, lambda f: torch.save(state, f))
    return corpus


# ---- batching ---------------------------------------------------------------------------
def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The stream as ``batch_size`` columns, shape ``(len // batch_size, batch_size)``.

    Column ``j`` is the contiguous stretch ``ids[j * rows:(j + 1) * rows]`` (AWD's
    ``batchify``), so a hidden state carried from one batch to the next reads on; the
    remainder is dropped.
    """
    rows = ids.numel() // batch_size
    if rows < 2:
        raise UserError(f"a stream of {ids.numel()} tokens is too short for batch size "
                        f"{batch_size}; lower the batch size")
    return ids[:rows * batch_size].view(batch_size, rows).t().contiguous()


def shard_columns(data: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s ``bs // world`` contiguous columns, so the global batch stays ``bs``."""
    per = micro_batch(data.size(1), world)  # a language model accumulates nothing
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside 0..{world - 1}")
    return data[:, rank * per:(rank + 1) * per].contiguous()


Batching = Literal["salesforce", "fastai"]
BATCHINGS = ("salesforce", "fastai")


class BPTTStream:
    """This rank's ``(inputs, targets, seq_len)`` batches of a token stream.

    ``variable=True`` (training) draws each batch's length as AWD-LSTM does: ``bptt`` with
    probability 0.95, else ``bptt / 2``, then ``max(5, int(normal(that, 5)))``, capped at
    the rows left. Where an epoch starts and ends is ``batching``'s:

    * ``"salesforce"`` (salesforce/awd-lstm-lm ``main.py``): every length is drawn and the
      epoch runs to the end of the data (``while i < rows - 2``), ~309 batches on WikiText-2
      at batch size 100 and bptt 70;
    * ``"fastai"`` (fastai 0.7's ``LanguageModelLoader``, which the post ran): the first
      batch is ``bptt + 25`` rows, and the epoch stops after ``rows // bptt - 1`` batches
      (297 there) or at the end of the data (``while i < rows - 1``), whichever comes first;
      there, the last ~740 of the 20,886 rows of an epoch are never trained on.

    The draws come from a generator seeded by ``(seed, epoch)`` alone, so every rank cuts the
    same rows and an epoch's batches are a function of ``(seed, epoch)``: resume from any
    batch with ``batches(epoch, start_batch)``. The number of batches varies by epoch under
    ``"salesforce"`` (``num_batches``); its loop scales the lr of a batch by
    ``lr_factor(seq_len)``.

    ``variable=False`` (evaluation) cuts fixed ``bptt`` rows, as AWD's ``evaluate``
    (batch size 10 for valid, 1 for test there).

    Paper values: bptt 70, batch size 100, ``"fastai"`` (the post's train_rnn.py).
    """

    def __init__(self, ids: torch.Tensor, batch_size: int, bptt: int = 70, *,
                 variable: bool = True, world: int = 1, rank: int = 0, seed: int = 0,
                 batching: Batching = "salesforce"):
        if bptt < 1:
            raise UserError(f"bptt={bptt} must be at least 1")
        if batching not in BATCHINGS:
            raise UserError(f"batching={batching!r} is unknown; choose one of {BATCHINGS}")
        self.data = shard_columns(batchify(ids, batch_size), world, rank)
        self.rows = self.data.size(0)
        if variable and self.rows < 3:
            raise UserError(f"a stream of {ids.numel()} tokens is too short for batch size "
                            f"{batch_size}; lower the batch size")
        if variable and batching == "fastai" and self.rows // bptt < 2:
            raise UserError(f"{self.rows} rows per column hold no fastai epoch of bptt {bptt} "
                            f"(rows // bptt - 1 batches); lower the bptt or the batch size")
        self.bptt, self.variable, self.seed, self.batching = bptt, variable, seed, batching
        self._lens: dict[int, list[int]] = {}

    def seq_lens(self, epoch: int = 0) -> list[int]:
        """The length of every batch of ``epoch``, the same on every rank."""
        if not self.variable:
            return [min(self.bptt, self.rows - 1 - i) for i in range(0, self.rows - 1, self.bptt)]
        if epoch not in self._lens:
            # Both loops, drawing per batch
            #   bptt if random() < 0.95 else bptt / 2;  seq_len = max(5, int(normal(that, 5)))
            # vectorized: every batch has >= 5 rows, so rows // 5 + 1 draws are enough, and
            # only the last batch can meet the end of the data (it is capped there).
            n = self.rows // 5 + 1
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            full = torch.rand(n, generator=gen, dtype=torch.float64) < 0.95
            base = torch.full((n,), float(self.bptt), dtype=torch.float64)
            base[~full] /= 2
            drawn = base + 5 * torch.randn(n, generator=gen, dtype=torch.float64)
            drawn = drawn.long().clamp(min=5)  # the cast truncates toward zero, as int()
            if self.batching == "fastai":
                # LanguageModelLoader: `if self.i == 0: seq_len = self.bptt + 5 * 5` (the
                # longest batch first, for CUDA's allocator); `while self.i < self.n - 1 and
                # self.iter < len(self)` with `len = n // bptt - 1`.
                drawn[0] = self.bptt + 25
                starts = drawn.cumsum(0) - drawn
                lens = drawn[starts < self.rows - 1][:self.rows // self.bptt - 1].tolist()
            else:  # AWD's `while i < len(train_data) - 1 - 1`
                starts = drawn.cumsum(0) - drawn
                lens = drawn[starts < self.rows - 2].tolist()
            lens[-1] = min(lens[-1], self.rows - 1 - sum(lens[:-1]))
            self._lens = {epoch: lens}  # one epoch at a time is all a loop needs
        return self._lens[epoch]

    def num_batches(self, epoch: int = 0) -> int:
        return len(self.seq_lens(epoch))

    def total_batches(self, epochs: int) -> int:
        """Batches in epochs ``0..epochs-1``: the schedule's total steps, one step per batch."""
        return sum(self.num_batches(e) for e in range(epochs))

    def locate(self, step: int) -> tuple[int, int]:
        """``(epoch, batch)`` of global batch ``step`` (0-based), for resuming from a step."""
        epoch = 0
        while step >= (n := self.num_batches(epoch)):
            step, epoch = step - n, epoch + 1
        return epoch, step

    def lr_factor(self, seq_len: int) -> float:
        """AWD's lr rescaling for a batch of ``seq_len`` rows: ``seq_len / bptt``."""
        return seq_len / self.bptt

    def batches(self, epoch: int = 0, start_batch: int = 0
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """``(inputs, targets, seq_len)`` from batch ``start_batch`` of ``epoch`` on.

        Both tensors are ``(seq_len, bs // world)`` views; targets are inputs one row later.
        """
        lens = self.seq_lens(epoch)
        if not 0 <= start_batch <= len(lens):
            raise ValueError(f"start_batch {start_batch} outside 0..{len(lens)} in epoch {epoch}")
        i = sum(lens[:start_batch])
        for seq_len in lens[start_batch:]:
            yield self.data[i:i + seq_len], self.data[i + 1:i + 1 + seq_len], seq_len
            i += seq_len


class BPTTData:
    """A token stream as trainer data (the protocol of :mod:`toolkit.data.source`): one
    optimizer step per BPTT batch of :class:`BPTTStream`.

    The global batch is ``batch_size`` columns (AWD's ``batchify``); rank ``r`` takes its
    ``batch_size // world`` of them, and with ``accum`` accumulation steps those are split
    again into ``accum`` groups, micro-batch ``a`` being part ``a * world + r`` of
    ``world * accum`` (as :class:`~toolkit.sampler.GlobalBatchSampler` does for examples):
    the same columns and rows make one step for any number of processes and accumulation
    steps. A micro-batch is ``(inputs, targets, seq_len, first_of_epoch, part)``; a language
    model keeps one hidden state per ``part``. ``batch_size`` given here (evaluation: AWD's 10
    columns) overrides the trainer's.
    """

    def __init__(self, ids: torch.Tensor, bptt: int = 70, *, variable: bool = True,
                 seed: int = 0, batching: Batching = "salesforce", batch_size: int | None = None):
        self.ids, self.bptt, self.variable = ids, bptt, variable
        self.seed, self.batching, self.batch_size = seed, batching, batch_size
        self.streams: list[BPTTStream] = []

    def shard(self, *, batch_size: int, world: int, rank: int, accum: int,
              device: torch.device) -> BPTTData:
        view = copy.copy(self)
        columns = self.batch_size or batch_size
        view.streams = [BPTTStream(self.ids, columns, self.bptt, variable=self.variable,
                                   world=world * accum, rank=micro_part(a, world, rank),
                                   seed=self.seed,
                                   batching=self.batching) for a in range(accum)]
        for s in view.streams:
            s.data = s.data.to(device)
        return view

    def steps(self, epochs: int) -> int:
        return self.streams[0].total_batches(epochs)

    def epoch_at(self, step: int) -> float:
        epoch, k = self.streams[0].locate(step)
        return epoch + k / self.streams[0].num_batches(epoch)

    def lr_factor(self, seq_len: int) -> float:
        return self.streams[0].lr_factor(seq_len)

    def batches(self, step: int) -> Iterator[tuple]:
        epoch, k = self.streams[0].locate(step)
        while True:
            parts = zip(*(s.batches(epoch, k) for s in self.streams))
            for i, micro in enumerate(parts, start=k):
                for a, (x, y, seq_len) in enumerate(micro):
                    yield x, y, seq_len, i == 0, a
            epoch, k = epoch + 1, 0

    def eval_batches(self) -> Iterator[tuple]:
        for i, (x, y, seq_len) in enumerate(self.streams[0].batches()):
            yield x, y, seq_len, i == 0, 0
