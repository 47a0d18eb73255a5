"""``toolkit evaluate RUN_DIR``: a finished run scored again from its config.json and weights
gives the numbers it reported (digits at the end and at a checkpoint, one process or two;
WikiText-2 with the cache pointer, whose theta and lambda can be changed or searched from
one forward pass; a seeded sample of text); bad input is one line."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import DIGITS, ROOT, env, launch
from toolkit.experiments.sweep import launch_prefix

WT2 = ROOT / "recipes" / "wt2.py"
WT2_DIR = Path(os.environ.get("WIKITEXT2_DIR", ROOT.parent / "shared" / "data" / "wikitext-2"))


def evaluate(*args: str, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    launcher = launch_prefix("python" if nproc == 1 else "torchrun", nproc, None)
    proc = subprocess.run([*launcher, "-m", "toolkit.cli", "evaluate", *args], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("eval") / "digits"
    launch(DIGITS, ["--output-dir", str(run), "--max-steps", "20", "--eval-every", "10",
                    "--checkpoint-every", "10", "--strategy", "zero2", "--no-progress"],
           launcher="torchrun")
    return run


def test_the_final_weights_give_the_runs_results_on_its_two_processes(digits):
    evaluate(str(digits), nproc=2)
    got = json.loads((digits / "eval.json").read_text())
    results = json.loads((digits / "results.json").read_text())
    assert got["valid_accuracy"] == results["valid_accuracy"]
    assert got["valid_loss"] == pytest.approx(results["valid_loss"], rel=1e-12)


def test_a_zero2_checkpoint_gives_its_logged_eval_on_one_process(digits, tmp_path):
    evaluate(str(digits), "--checkpoint", "step_10", "--out", str(tmp_path / "e.json"))
    got = json.loads((tmp_path / "e.json").read_text())
    rows = [json.loads(x) for x in (digits / "metrics.jsonl").read_text().splitlines()]
    logged = next(r for r in rows if r["step"] == 10 and "valid_accuracy" in r)
    assert got["valid_accuracy"] == logged["valid_accuracy"] and got["checkpoint"] == "step_10"
    # Summed by one process instead of two: the same numbers up to float rounding.
    assert got["valid_loss"] == pytest.approx(logged["valid_loss"], rel=1e-6)


@pytest.mark.slow  # 12 s: CI runs it after the default run
def test_an_fsdp2_checkpoint_gives_its_logged_eval_on_one_process(tmp_path):
    run = tmp_path / "fsdp2"
    launch(DIGITS, ["--output-dir", str(run), "--max-steps", "20", "--eval-every", "10",
                    "--checkpoint-every", "10", "--strategy", "fsdp2", "--no-progress"],
           launcher="torchrun")
    evaluate(str(run), "--checkpoint", "step_10", "--out", str(tmp_path / "e.json"))
    got = json.loads((tmp_path / "e.json").read_text())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = next(r for r in rows if r["step"] == 10 and "valid_accuracy" in r)
    assert got["valid_accuracy"] == logged["valid_accuracy"]
    assert got["valid_loss"] == pytest.approx(logged["valid_loss"], rel=1e-6)


def test_bad_input_is_one_line(digits, tmp_path):
    cases = [([str(tmp_path)], "not a finished run folder"),
             ([str(digits), "--checkpoint", "step_7"], "the run has step_10, step_20"),
             ([str(digits), "--", "--width", "0"], "--width=0")]
    for args, expected in cases:
        proc = evaluate(*args, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert expected in proc.stderr, proc.stderr


@pytest.mark.slow  # 59 s: CI runs it after the default run
@pytest.mark.skipif(not WT2_DIR.is_dir(), reason=f"no WikiText-2 at {WT2_DIR}")
def test_wikitext2_with_the_cache_pointer_reproduces_its_results(tmp_path):
    run = tmp_path / "wt2"
    launch(WT2, ["--preset", "cpu", "--data-dir", str(WT2_DIR), "--output-dir", str(run),
                 "--max-steps", "6", "--eval-tokens", "3000", "--no-progress"], timeout=600)
    evaluate(str(run))
    results = json.loads((run / "results.json").read_text())
    got = json.loads((run / "eval.json").read_text())
    for key in ("valid_ppl", "valid_ppl_bs1", "test_ppl", "valid_cache_ppl", "test_cache_ppl"):
        assert got[key] == pytest.approx(results[key], rel=1e-12), key
    evaluate(str(run), "--out", str(tmp_path / "theta.json"), "--", "--cache-theta", "0.3")
    other = json.loads((tmp_path / "theta.json").read_text())
    assert other["valid_ppl_bs1"] == got["valid_ppl_bs1"]
    assert other["valid_cache_ppl"] != got["valid_cache_ppl"]
    proc = evaluate(str(run), "--", "--cache-theta", "0", check=False)
    assert proc.returncode == 2 and "theta" in proc.stderr and proc.stderr.count("\n") == 1
    # One forward pass, a grid of (theta, lambda): the run's own pair scores its results.
    proc = evaluate(str(run), "--tune-cache", "--thetas", "0.2", "0.5", "--lambdas", "0.1",
                    "0.2", "--out", str(tmp_path / "tune.json"))
    tune = json.loads((tmp_path / "tune.json").read_text())["tune_cache"]
    assert tune["pairs"] == 3 * 3  # the run's 0.662 and 0.1279 join the lists
    default, best = tune["default"], tune["best"]
    assert (default["theta"], default["lambda"]) == (0.662, 0.1279)
    assert default["valid_cache_ppl"] == pytest.approx(results["valid_cache_ppl"], rel=1e-12)
    assert default["test_cache_ppl"] == pytest.approx(results["test_cache_ppl"], rel=1e-12)
    assert best["valid_cache_ppl"] == min(r["valid_cache_ppl"] for r in tune["grid"])
    assert best["valid_cache_ppl"] <= default["valid_cache_ppl"]
    assert tune["forward_pass_s"] > 0 and "pairs in" in proc.stdout
    proc = evaluate(str(run), "--tune-cache", "--thetas", "0", check=False)
    assert proc.returncode == 2 and "--thetas" in proc.stderr
    # A sample: seeded, so the same seed gives the same text.
    texts = []
    for i, seed in enumerate(("1", "1", "2")):
        out = tmp_path / f"sample{i}.json"
        evaluate(str(run), "--generate", "25", "--temperature", "0.8", "--seed", seed,
                 "--out", str(out))
        sample = json.loads(out.read_text())["sample"]
        assert sample["tokens"] == 25 and sample["text"].strip()
        texts.append(sample["text"])
    assert texts[0] == texts[1] != texts[2]


def test_tune_cache_and_samples_need_a_language_model(digits):
    proc = evaluate(str(digits), "--tune-cache", check=False)
    assert proc.returncode == 2 and "no cache pointer to tune" in proc.stderr
    proc = evaluate(str(digits), "--generate", "5", check=False)
    assert proc.returncode == 2 and "not a language model" in proc.stderr
