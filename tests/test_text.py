"""``recipes/text.py`` on a generated corpus (tests/text_corpus.py): word-level on a raw-text
folder and sentencepiece on a ``datasets`` folder learn it far below the uniform perplexity,
save their tokenizer, and ``toolkit evaluate --generate`` reuses it; bad text is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import text_corpus
from conftest import ROOT, launch
from test_evaluate import evaluate
from toolkit.run_folder import RunFolder

TEXT = ROOT / "recipes" / "text.py"
SMALL = ["--preset", "cpu-adam", "--cutoffs", "None", "--emb-size", "32", "--hidden-size",
         "64", "--bptt", "20", "--batch-size", "16", "--eval-batch-size", "4", "--no-progress",
         "--threads", "1"]


def check_run(run: Path, vocab_size: int) -> dict:
    results = RunFolder(run).read_results()
    assert results["valid_ppl"] < vocab_size / 4, results  # uniform would be vocab_size
    evaluate(str(run), "--generate", "30")
    got = json.loads((run / "eval.json").read_text())
    assert got["valid_ppl"] == pytest.approx(results["valid_ppl"], rel=1e-9)
    assert got["sample"]["text"].strip(), got["sample"]
    return got


def test_word_level_on_a_raw_text_folder(tmp_path):
    data, run = text_corpus.write(tmp_path / "corpus"), tmp_path / "run"
    launch(TEXT, ["--data-dir", str(data), "--output-dir", str(run), "--epochs", "3", *SMALL])
    saved = RunFolder(run).read_tokenizer()
    assert saved["tokenizer"] == "word" and saved["sp_model"] is None
    got = check_run(run, len(saved["vocab"]))
    words = set(" ".join(text_corpus.splits()["train"]).split())
    assert set(got["sample"]["text"].split()) <= words | {"<eos>", "<unk>"}


@pytest.mark.slow  # ~25 s (sentencepiece and datasets): CI runs it after the default run
def test_sentencepiece_on_a_datasets_folder(tmp_path):
    data, run = text_corpus.write_datasets(tmp_path / "hf"), tmp_path / "run"
    launch(TEXT, ["--data-dir", str(data), "--text-column", "body", "--tokenizer",
                  "sentencepiece", "--vocab-size", "300", "--output-dir", str(run),
                  "--epochs", "2", *SMALL])
    saved = RunFolder(run).read_tokenizer()
    assert saved["tokenizer"] == "sentencepiece" and len(saved["vocab"]) == 300
    model = (run / "tokenizer.model").read_bytes()
    check_run(run, 300)
    assert (run / "tokenizer.model").read_bytes() == model  # reused, not trained again


def bad_corpus(tmp: Path, case: str) -> tuple[Path, list[str], str]:
    data = text_corpus.write(tmp / case, n_train=60)
    if case == "latin1":
        (data / "valid.txt").write_bytes("caf\xe9 au lait .\n".encode("latin-1"))
        return data, [], "valid.txt: not UTF-8 text (byte 3"
    if case == "empty-split":
        (data / "test.txt").write_text("\n \n", encoding="utf-8")
        return data, [], "the test split has no text"
    if case == "missing-file":
        (data / "test.txt").unlink()
        return data, [], "test.txt missing"
    if case == "vocab-too-large":
        return data, ["--tokenizer", "sentencepiece", "--vocab-size", "5000"], \
            "sentencepiece cannot train vocab_size=5000"
    if case == "cutoffs":
        return data, ["--cutoffs", "2000", "10000"], "below the vocabulary size"
    raise ValueError(case)


@pytest.mark.parametrize("case", ["latin1", "vocab-too-large"])
def test_bad_text_is_one_line(case, tmp_path):
    data, extra, expected = bad_corpus(tmp_path, case)
    run = tmp_path / "run"
    args = [a for a in SMALL if a not in ("--cutoffs", "None")] if case == "cutoffs" else SMALL
    proc = launch(TEXT, ["--data-dir", str(data), "--output-dir", str(run), *args, *extra],
                  check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert expected in proc.stderr, proc.stderr
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


@pytest.mark.parametrize("case", ["empty-split", "missing-file", "cutoffs"])
def test_more_bad_text_is_one_line(case, tmp_path):
    """The other faults, in this process (the two above show the whole program's exit 2 and
    one line for such an error)."""
    from recipes import text
    from toolkit.config import parse
    from toolkit.errors import UserError

    data, extra, expected = bad_corpus(tmp_path, case)
    args = [a for a in SMALL if a not in ("--cutoffs", "None")] if case == "cutoffs" else SMALL
    args = args[:-2]  # not --threads 1: it would hold for the tests after this one
    cfg = parse(text.PRESETS, ["--data-dir", str(data), "--output-dir", str(tmp_path / "run"),
                               *args, *extra])
    with pytest.raises(UserError) as e:
        text.build(cfg)
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_hf_name_goes_through_load_dataset(tmp_path):
    """``hf:NAME`` is ``datasets.load_dataset(NAME)``: here a local folder of text files
    (its text builder; nothing downloads), giving the lines the folder reader gives."""
    from recipes.text import read_text

    data = text_corpus.write(tmp_path / "corpus", n_train=60)
    via_hf, direct = read_text(f"hf:{data}", "text"), read_text(str(data), "text")
    assert {k: [l.rstrip("\n") for l in v] for k, v in direct.items()} == via_hf
