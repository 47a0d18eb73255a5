"""WikiText-2: exact counts on the real files, the HF path, the cache, and BPTT batching
(sharding over ranks, AWD's variable lengths, exact resume)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from toolkit.lm import data as wt
from toolkit.lm.data import BPTTStream, Corpus, batchify, load_wikitext2
from toolkit.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("WIKITEXT2_DIR", ROOT.parent / "shared" / "data" / "wikitext-2"))
needs_real = pytest.mark.skipif(
    not (REAL / "train.txt").is_file() and not (REAL / "wiki.train.tokens").is_file(),
    reason=f"no WikiText-2 at {REAL}; set WIKITEXT2_DIR to a folder with train.txt or "
           "wiki.train.tokens")

TINY = {"train": [" b a a \n", "\n", " c b \n"], "valid": [" a zzz \n"], "test": [" c"]}


def write(folder: Path, lines: dict[str, list[str]], pattern: str = "wiki.{}.tokens") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, split_lines in lines.items():
        (folder / pattern.format(split)).write_text("".join(split_lines), encoding="utf-8")
    return folder


def forbid_tokenize(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("tokenized again despite the cache")
    monkeypatch.setattr(wt, "tokenize", fail)


# ---- the real files ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def real(tmp_path_factory) -> tuple[Corpus, Path]:
    if not REAL.is_dir():
        pytest.skip(f"no WikiText-2 at {REAL}; set WIKITEXT2_DIR")
    cache = tmp_path_factory.mktemp("cache")
    return load_wikitext2(REAL, cache_dir=cache), cache


@needs_real
def test_real_counts_match_awd_lstm(real):
    corpus, _ = real
    assert (corpus.train.numel(), corpus.valid.numel(), corpus.test.numel()) == \
        (2_088_628, 217_646, 245_569)
    assert corpus.vocab_size == 33_278
    lines = wt.read_dir(REAL)
    for split in wt.SPLITS:  # one <eos> per line, empty lines included
        ids = getattr(corpus, split)
        assert (ids == corpus.eos_id).sum().item() == len(lines[split])
        assert ids.max().item() < corpus.vocab_size
    # Valid and test hold no word outside train: <unk> only where the text says <unk>.
    unk = corpus.vocab.index(wt.UNK)
    literal = sum(line.split().count(wt.UNK) for line in lines["valid"])
    assert (corpus.valid == unk).sum().item() == literal


@needs_real
def test_real_vocab_is_frequency_ordered_ties_by_first_appearance(real):
    corpus, _ = real
    train = corpus.train
    counts = torch.bincount(train, minlength=corpus.vocab_size)
    assert corpus.vocab[0] == "the" and counts[0].item() == 113_161
    assert (counts[:-1] >= counts[1:]).all()
    first = torch.full((corpus.vocab_size,), train.numel()).scatter_reduce(
        0, train, torch.arange(train.numel()), "amin")
    ties = counts[:-1] == counts[1:]
    assert ties.sum() > 1000  # many words share a count: the rule is exercised
    assert (first[:-1][ties] < first[1:][ties]).all()


@needs_real
def test_real_first_lines_round_trip(real):
    corpus, _ = real
    lines = wt.read_dir(REAL)["train"][:3]  # " \n", " = Valkyria Chronicles III = \n", " \n"
    n = sum(len(l.split()) + 1 for l in lines)
    ids = corpus.train[:n]
    assert [corpus.vocab[i] for i in ids] == [w for l in lines for w in l.split() + ["<eos>"]]
    assert corpus.decode(ids) == "\n= Valkyria Chronicles III =\n\n"
    assert torch.equal(corpus.encode(lines), ids)


@needs_real
def test_real_second_load_hits_the_cache(real, monkeypatch):
    corpus, cache = real
    files = list(cache.glob("wikitext2-word-*.pt"))
    assert len(files) == 1 and not list(cache.glob(".*.tmp"))
    forbid_tokenize(monkeypatch)
    again = load_wikitext2(REAL, cache_dir=cache)
    for split in wt.SPLITS:
        assert torch.equal(getattr(again, split), getattr(corpus, split))
    assert again.vocab == corpus.vocab


# ---- small data: vocabulary, cache, HF, errors ------------------------------------------
def test_vocab_order_unk_and_eos_per_line(tmp_path):
    corpus = load_wikitext2(write(tmp_path / "d", TINY), use_cache=False)
    # counts <eos> 3, b 2, a 2, c 1: the b/a tie in order of first appearance; <unk> added last.
    assert corpus.vocab == ["<eos>", "b", "a", "c", "<unk>"]
    assert corpus.train.tolist() == [1, 2, 2, 0, 0, 3, 1, 0]  # the empty line is one <eos>
    assert corpus.valid.tolist() == [2, 4, 0]  # the unseen "zzz" is <unk>
    assert corpus.test.tolist() == [3, 0]  # an unterminated last line still gets its <eos>
    assert corpus.decode(corpus.train) == "b a a\n\nc b\n"


def test_cache_is_keyed_by_content(tmp_path, monkeypatch):
    data, cache = write(tmp_path / "d", TINY), tmp_path / "cache"
    first = load_wikitext2(data, cache_dir=cache)
    forbid_tokenize(monkeypatch)
    assert torch.equal(load_wikitext2(data, cache_dir=cache).train, first.train)
    # Same text under the other file names: same key, still no tokenizing.
    other = write(tmp_path / "e", TINY, "{}.txt")
    assert torch.equal(load_wikitext2(other, cache_dir=cache).valid, first.valid)
    write(data, {"train": [" b a \n"]})  # changed text must not be served from the cache
    with pytest.raises(AssertionError, match="tokenized again"):
        load_wikitext2(data, cache_dir=cache)


def test_corrupt_cache_is_a_user_error(tmp_path):
    data, cache = write(tmp_path / "d", TINY), tmp_path / "cache"
    load_wikitext2(data, cache_dir=cache)
    (path,) = cache.glob("*.pt")
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(UserError, match="delete it"):
        load_wikitext2(data, cache_dir=cache)


def test_hf_dataset_gives_the_same_ids_as_files(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = {"train": TINY["train"], "validation": TINY["valid"], "test": TINY["test"]}
    dd = datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in rows.items()})
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: asked.append(a) or dd)
    from_hf = load_wikitext2(None, cache_dir=tmp_path / "cache")
    assert asked == [("Salesforce/wikitext", "wikitext-2-v1")]
    from_files = load_wikitext2(write(tmp_path / "d", TINY), use_cache=False)
    for split in wt.SPLITS:
        assert torch.equal(getattr(from_hf, split), getattr(from_files, split))
    assert from_hf.vocab == from_files.vocab


def test_offline_without_data_dir_names_the_flag(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub\n(details)")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError) as err:
        load_wikitext2(None, use_cache=False)
    msg = str(err.value)
    assert "--data-dir" in msg and "Couldn't reach" in msg and "\n" not in msg


def test_missing_or_empty_data_dir(tmp_path):
    with pytest.raises(UserError, match=r"--data-dir .*nowhere is not a folder"):
        load_wikitext2(tmp_path / "nowhere")
    write(tmp_path / "half", {"train": TINY["train"]}, "{}.txt")  # train only
    with pytest.raises(UserError) as err:
        load_wikitext2(tmp_path / "half")
    msg = str(err.value)
    assert str(tmp_path / "half") in msg
    assert all(name in msg for name in ("wiki.train.tokens", "train.txt", "valid.txt", "test.txt"))


def test_bad_options(tmp_path):
    data = write(tmp_path / "d", TINY)
    with pytest.raises(UserError, match="unknown tokenizer"):
        load_wikitext2(data, tokenizer="bpe")
    with pytest.raises(UserError, match="vocab_size is for tokenizer='sentencepiece'"):
        load_wikitext2(data, vocab_size=100)
    with pytest.raises(UserError, match="unknown WikiText-2 config"):
        load_wikitext2(None, hf_config="wikitext-103-v1")


# ---- sentencepiece ----------------------------------------------------------------------
@needs_real
def test_sentencepiece_round_trips_and_is_deterministic(tmp_path):
    full = wt.read_dir(REAL)
    data = write(tmp_path / "d", {"train": full["train"][:2000], "valid": full["valid"][:300],
                                  "test": full["test"][:300]})
    a = load_wikitext2(data, tokenizer="sentencepiece", vocab_size=500, use_cache=False)
    b = load_wikitext2(data, tokenizer="sentencepiece", vocab_size=500, use_cache=False)
    assert a.sp_model == b.sp_model and torch.equal(a.train, b.train)
    assert a.vocab_size == 500 and a.vocab[a.eos_id] == "<eos>"
    assert (a.valid == a.eos_id).sum().item() == 300
    lines = full["valid"][:300]  # unseen text, non-ASCII included, comes back exactly
    assert any(not l.isascii() for l in lines)
    assert a.decode(a.valid) == "".join(" ".join(l.split()) + "\n" for l in lines)
    assert a.decode(a.encode(full["train"][:50])) == \
        "".join(" ".join(l.split()) + "\n" for l in full["train"][:50])


def test_sentencepiece_vocab_too_small_is_a_user_error(tmp_path):
    data = write(tmp_path / "d", TINY)
    with pytest.raises(UserError, match="sentencepiece cannot train vocab_size=3"):
        load_wikitext2(data, tokenizer="sentencepiece", vocab_size=3, use_cache=False)


# ---- batching ---------------------------------------------------------------------------
def test_batchify_drops_the_remainder_and_keeps_columns_contiguous():
    data = batchify(torch.arange(103), 10)
    assert data.shape == (10, 10)
    for j in range(10):
        assert torch.equal(data[:, j], torch.arange(j * 10, j * 10 + 10))
    with pytest.raises(UserError, match="too short"):
        batchify(torch.arange(15), 10)


def test_batch_size_must_divide_over_ranks():
    with pytest.raises(UserError, match=r"batch_size=10 must be a positive multiple of "
                                        r"processes x grad_accum = 4 x 1"):
        BPTTStream(torch.arange(1000), 10, world=4, rank=0)


@pytest.mark.parametrize("variable", [True, False])
def test_ranks_take_disjoint_columns_that_make_the_global_batch(variable):
    ids, bs, world = torch.arange(40_000), 8, 4
    single = BPTTStream(ids, bs, 70, variable=variable, seed=3)
    ranks = [BPTTStream(ids, bs, 70, variable=variable, world=world, rank=r, seed=3)
             for r in range(world)]
    assert all(r.data.shape == (5000, 2) for r in ranks)
    tokens = [set(r.data.flatten().tolist()) for r in ranks]
    assert sum(map(len, tokens)) == len(set().union(*tokens)) == 40_000  # disjoint, complete
    for epoch in (0, 1):
        lens = single.seq_lens(epoch)
        assert all(r.seq_lens(epoch) == lens for r in ranks)  # same cut on every rank
        per_rank = [list(r.batches(epoch)) for r in ranks]
        for k, (x, y, n) in enumerate(single.batches(epoch)):
            assert torch.equal(torch.cat([p[k][0] for p in per_rank], 1), x)
            assert torch.equal(torch.cat([p[k][1] for p in per_rank], 1), y)
            assert all(p[k][2] == n for p in per_rank)


def test_batches_cover_the_stream_targets_shifted_lr_factor():
    stream = BPTTStream(torch.arange(80 * 1000), 80, 70, seed=0)
    lens = stream.seq_lens(0)
    assert sum(lens) in (stream.rows - 2, stream.rows - 1)  # AWD stops 2 rows short at most
    assert all(n >= 5 for n in lens[:-1])
    i = 0
    for x, y, n in stream.batches(0):
        assert x.shape == y.shape == (n, 80)
        assert torch.equal(x, stream.data[i:i + n])
        assert torch.equal(y, x + 1)  # the arange stream: next token in each column
        assert stream.lr_factor(n) == n / 70
        i += n


def test_variable_lengths_follow_awd_lstm():
    stream = BPTTStream(torch.arange(200_000), 1, 70, seed=0)  # 200,000 rows
    lens = [n for e in range(3) for n in stream.seq_lens(e)[:-1]]  # the capped last ones out
    assert len(lens) > 8000
    half = sum(n < 52 for n in lens) / len(lens)
    assert 0.035 < half < 0.065  # bptt / 2 with probability 0.05
    mean = sum(lens) / len(lens)  # 0.95 * 69.5 + 0.05 * 34.5 (int() truncates)
    assert 67.2 < mean < 68.3
    assert min(lens) >= 5 and max(lens) < 100


def awd_loop(rows: int, bptt: int, seed: int, epoch: int) -> list[int]:
    """AWD-LSTM's train loop and get_batch, read literally, on the stream's draws."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    n = rows // 5 + 1
    randoms = torch.rand(n, generator=gen, dtype=torch.float64).tolist()
    normals = torch.randn(n, generator=gen, dtype=torch.float64).tolist()
    lens, i = [], 0
    while i < rows - 1 - 1:
        k = len(lens)
        base = bptt if randoms[k] < 0.95 else bptt / 2.
        seq_len = max(5, int(base + 5 * normals[k]))
        lens.append(min(seq_len, rows - 1 - i))  # get_batch's cap
        i += seq_len
    return lens


def test_variable_lengths_equal_awd_loop():
    stops_two_short = 0
    for rows in [*range(3, 400), 1000, 5000]:
        for seed, epoch in [(0, 0), (7, 2)]:
            stream = BPTTStream(torch.arange(rows * 2), 2, 70, seed=seed)
            assert stream.rows == rows
            lens = awd_loop(rows, 70, seed, epoch)
            assert stream.seq_lens(epoch) == lens, (rows, seed, epoch)
            stops_two_short += sum(lens) == rows - 2
    assert stops_two_short > 5  # AWD's edge (no 1-row last batch) was exercised


def fastai_loop(rows: int, bptt: int, seed: int, epoch: int) -> list[int]:
    """fastai 0.7's LanguageModelLoader.__iter__ and get_batch (old/fastai/text.py), read
    literally, on the stream's draws (batch k uses draw k; the first batch draws nothing)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    n = rows // 5 + 1
    randoms = torch.rand(n, generator=gen, dtype=torch.float64).tolist()
    normals = torch.randn(n, generator=gen, dtype=torch.float64).tolist()
    lens, i, it = [], 0, 0
    while i < rows - 1 and it < rows // bptt - 1:
        k = len(lens)
        if i == 0:
            seq_len = bptt + 5 * 5
        else:
            base = bptt if randoms[k] < 0.95 else bptt / 2.
            seq_len = max(5, int(base + 5 * normals[k]))
        lens.append(min(seq_len, rows - 1 - i))  # get_batch's cap
        i += seq_len
        it += 1
    return lens


def test_fastai_lengths_equal_language_model_loader():
    ran_out = stopped_at_len = one_row_last = 0
    for rows in [*range(20, 400), 1000, 5000]:
        for seed, epoch in [(0, 0), (7, 2)]:
            stream = BPTTStream(torch.arange(rows * 2), 2, 10, seed=seed, batching="fastai")
            lens = fastai_loop(rows, 10, seed, epoch)
            assert stream.seq_lens(epoch) == lens, (rows, seed, epoch)
            ran_out += sum(lens) == rows - 1
            stopped_at_len += len(lens) == rows // 10 - 1 and sum(lens) < rows - 1
            one_row_last += len(lens) > 1 and lens[-1] == 1  # `i < n - 1`, not AWD's `n - 2`
    # Both ends of fastai's loop, and its edge, were exercised.
    assert ran_out > 5 and stopped_at_len > 5 and one_row_last > 5


def test_fastai_epoch_is_rows_over_bptt_minus_one_batches():
    stream = BPTTStream(torch.arange(100 * 20_000), 100, 70, seed=3, batching="fastai")
    salesforce = BPTTStream(torch.arange(100 * 20_000), 100, 70, seed=3)
    for epoch in range(5):
        lens = stream.seq_lens(epoch)
        assert len(lens) == 20_000 // 70 - 1 == 284
        assert lens[0] == 95  # bptt + 25, the longest batch first
        assert sum(lens) < 20_000 - 600  # the rest of the epoch's rows are never seen
        assert salesforce.num_batches(epoch) > 290  # AWD runs on to the end of the data
    assert stream.total_batches(3) == 3 * 284


def test_fastai_batching_needs_two_bptt_of_rows():
    BPTTStream(torch.arange(2 * 140), 2, 70, batching="fastai")  # 140 rows: one batch
    with pytest.raises(UserError, match="no fastai epoch of bptt 70"):
        BPTTStream(torch.arange(2 * 139), 2, 70, batching="fastai")
    with pytest.raises(UserError, match="batching='awd' is unknown"):
        BPTTStream(torch.arange(1000), 2, 70, batching="awd")


def test_lengths_are_a_function_of_seed_and_epoch():
    ids = torch.arange(50_000)
    a, b = BPTTStream(ids, 10, 70, seed=1), BPTTStream(ids, 10, 70, seed=1)
    assert a.seq_lens(0) == b.seq_lens(0) and a.seq_lens(1) == b.seq_lens(1)
    assert a.seq_lens(0) != a.seq_lens(1)
    assert BPTTStream(ids, 10, 70, seed=2).seq_lens(0) != a.seq_lens(0)
    counts = {a.num_batches(e) for e in range(20)}
    assert len(counts) > 1  # the number of batches per epoch varies with the draws


@pytest.mark.parametrize("batching", ["salesforce", "fastai"])
def test_resume_from_batch_k_yields_the_remaining_batches(batching):
    stream = BPTTStream(torch.arange(30_000), 6, 70, seed=5, batching=batching)
    full = list(stream.batches(2))
    for k in (0, 1, 17, len(full) - 1, len(full)):
        # a restarted process
        fresh = BPTTStream(torch.arange(30_000), 6, 70, seed=5, batching=batching)
        rest = list(fresh.batches(2, start_batch=k))
        assert len(rest) == len(full) - k
        for (x, y, n), (x2, y2, n2) in zip(full[k:], rest):
            assert n == n2 and torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(ValueError, match="start_batch"):
        next(stream.batches(2, start_batch=len(full) + 1))


def test_locate_maps_a_global_step_to_epoch_and_batch():
    stream = BPTTStream(torch.arange(30_000), 6, 70, seed=5)
    n0, n1 = stream.num_batches(0), stream.num_batches(1)
    assert stream.total_batches(2) == n0 + n1
    assert stream.locate(0) == (0, 0)
    assert stream.locate(n0 - 1) == (0, n0 - 1)
    assert stream.locate(n0) == (1, 0)
    assert stream.locate(n0 + n1 + 3) == (2, 3)


def test_eval_batches_have_fixed_length():
    stream = BPTTStream(torch.arange(10 * 1000), 10, 70, variable=False)
    lens = stream.seq_lens()
    assert lens[:-1] == [70] * (len(lens) - 1) and sum(lens) == stream.rows - 1  # 999 = 14*70+19
    assert lens[-1] == 19
    assert stream.seq_lens(0) == stream.seq_lens(7)
