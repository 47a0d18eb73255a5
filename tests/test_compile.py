"""``--compile``: the model's forward through torch.compile (inductor, CPU here).

A compiled run is not bitwise the eager one (inductor fuses and reorders float ops), so
these check what does hold: it resumes bitwise (dropout included), 2 processes train like 1,
it stays close to eager, the LR finder leaves no trace, and torch.compile makes a fixed number of graphs
however long the run (1cycle moves lr and beta1 every step; a stage that freezes layers
compiles once more, not every step)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import DIGITS, TINY, dumps, launch
from toolkit.checkpoint import weights as checkpoint_weights
from toolkit.run_folder import RunFolder

ARGS = ["--compile", "--dropout", "0.2", "--checkpoint-every", "6", "--keep-checkpoints", "5"]


def results(run: Path) -> dict:
    return RunFolder(run).read_results()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    """12 compiled steps, checkpointed at 6 and 12; its dump is ``run.dump``."""
    run = tmp_path_factory.mktemp("compiled") / "run"
    launch(TINY, ["--output-dir", str(run), *ARGS, "--max-steps", "12",
                  "--dump", str(run) + ".dump"], timeout=600)
    return run


def params(run: Path, world: int = 1) -> list[dict[str, torch.Tensor]]:
    return [d["params"] for d in dumps(Path(str(run) + ".dump"), world)]


def test_graphs_do_not_grow_with_the_run(compiled, tmp_path):
    # train, eval, the eval set's smaller last batch: 1cycle's lr and beta1 changing at
    # every step must not add any.
    longer = tmp_path / "longer"
    launch(TINY, ["--output-dir", str(longer), *ARGS, "--max-steps", "30"], timeout=600)
    graphs = results(compiled)["compiled_graphs"]
    assert 1 <= graphs <= 4
    assert results(longer)["compiled_graphs"] == graphs


def test_compiled_run_resumes_bitwise(compiled, tmp_path):
    resumed = tmp_path / "resumed"
    launch(TINY, ["--output-dir", str(resumed), *ARGS, "--max-steps", "12", "--resume",
                  str(compiled / "checkpoints" / "step_6"), "--dump", str(resumed) + ".dump"],
           timeout=600)
    (a,), (b,) = params(compiled), params(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow  # ~25 s: three runs, one of them 2 processes compiling
def test_compiled_is_close_to_eager_and_two_processes_to_one(tmp_path):
    # Without dropout: inductor draws its masks with its own generator (seeded from torch's,
    # so resume holds), not eager's.
    runs = {name: tmp_path / name for name in ("compiled", "eager", "two")}
    no_dropout = [*ARGS, "--dropout", "0", "--max-steps", "12"]
    launch(TINY, ["--output-dir", str(runs["compiled"]), *no_dropout,
                  "--dump", str(runs["compiled"]) + ".dump"], timeout=600)
    launch(TINY, ["--output-dir", str(runs["eager"]), *no_dropout[1:],
                  "--dump", str(runs["eager"]) + ".dump"])
    proc = launch(TINY, ["--output-dir", str(runs["two"]), *no_dropout,
                         "--dump", str(runs["two"]) + ".dump"], launcher="torchrun", timeout=600)
    assert "on 2 process(es)" in proc.stdout
    assert results(runs["compiled"])["compiled_graphs"] >= 1
    assert "compiled_graphs" not in results(runs["eager"])
    (one,), (ref,) = params(runs["compiled"]), params(runs["eager"])
    for k in one:
        torch.testing.assert_close(one[k], ref[k], rtol=1e-4, atol=1e-5)
    for rank in params(runs["two"], 2):
        for k in one:
            torch.testing.assert_close(rank[k], one[k], rtol=1e-4, atol=1e-5)


def test_lr_finder_with_compile_leaves_no_trace(compiled, tmp_path):
    found = tmp_path / "found"
    launch(TINY, ["--output-dir", str(found), *ARGS, "--max-steps", "12", "--lr-find",
                  "--then-fit", "--dump", str(found) + ".dump"], timeout=600)
    (a,), (b,) = params(compiled), params(found)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_stages_compile_once_more_and_resume_bitwise(tmp_path):
    # Digits in two stages (head only, then everything): the freeze is one more graph, not
    # one per step; mid-stage-2 resume is bitwise.
    stage_args = ["--compile", "--freeze-epochs", "1", "--epochs", "1", "--checkpoint-every",
                  "11", "--keep-checkpoints", "20", "--no-progress"]
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    launch(DIGITS, ["--output-dir", str(run), *stage_args], timeout=900)
    assert 2 <= results(run)["compiled_graphs"] <= 8
    launch(DIGITS, ["--output-dir", str(resumed), *stage_args, "--resume",
                    str(run / "checkpoints" / "step_33")], timeout=900)
    a, b = (checkpoint_weights(r / "checkpoints" / "step_44") for r in (run, resumed))
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["zero2", "zero3", "fsdp2"])
def test_sharded_strategies_compile_a_fixed_number_of_graphs(strategy, tmp_path):
    # DeepSpeed's engine wraps the compiled model (ZeRO-3's gathering hooks break it into
    # more graphs); FSDP2 compiles each block's forward. Neither may recompile as the run
    # goes on, and both train like one eager process.
    eager = tmp_path / "eager"
    launch(TINY, ["--output-dir", str(eager), "--dropout", "0", "--max-steps", "12",
                  "--dump", str(eager) + ".dump"])
    graphs = []
    for steps in (12, 24):
        run = tmp_path / f"{strategy}{steps}"
        launch(TINY, ["--output-dir", str(run), "--compile", "--dropout", "0", "--strategy",
                      strategy, "--max-steps", str(steps), "--dump", str(run) + ".dump"],
               launcher="torchrun", timeout=600)
        graphs.append(results(run)["compiled_graphs"])
    assert graphs[0] >= 1 and graphs[1] == graphs[0]
    (ref,), ranks = params(eager), params(tmp_path / f"{strategy}12", 2)
    for k in ref:  # rank 0's: FSDP2 gathers the whole state dict there alone
        torch.testing.assert_close(ranks[0][k], ref[k], rtol=1e-4, atol=1e-5)
