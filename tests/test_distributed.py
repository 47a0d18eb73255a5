"""Two real processes on CPU over gloo, through ``torchrun`` and ``accelerate launch``:
world size, data sharding, identical parameters across ranks, parity with one process,
and the 1cycle sequence per optimizer step under gradient accumulation."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, dumps, launch

STEPS_PER_EPOCH = 10  # tiny: 320 examples, global batch 32


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    d = tmp_path_factory.mktemp("single")
    launch(TINY, ["--output-dir", str(d / "run"), "--dump", str(d / "dump"),
                  "--checkpoint-every", "7", "--keep-checkpoints", "5"])
    return {**dumps(d / "dump", 1)[0], "run": d / "run"}


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_shard_data_and_match_one_process(launcher, single, tmp_path):
    launch(TINY, ["--output-dir", str(tmp_path / "run"), "--dump", str(tmp_path / "dump"),
                  "--checkpoint-every", "7", "--keep-checkpoints", "5"], launcher=launcher)
    ranks = dumps(tmp_path / "dump", 2)
    for r, d in enumerate(ranks):
        assert (d["world"], d["rank"]) == (2, r)
        assert "MULTI_CPU" in d["distributed_type"]
        assert len(d["seen"]) == 2 * STEPS_PER_EPOCH  # one micro-batch per step per rank
    for step in range(2 * STEPS_PER_EPOCH):
        a, b = ranks[0]["seen"][step], ranks[1]["seen"][step]
        assert len(a) == len(b) == 16 and not set(a) & set(b)
        # Together the ranks see exactly the global batch the single process saw.
        assert sorted(a + b) == sorted(single["seen"][step])
    for epoch in range(2):
        steps = range(epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH)
        seen = [i for s in steps for r in ranks for i in r["seen"][s]]
        assert len(seen) == len(set(seen)) == 320  # no example twice in an epoch
    for k, v in ranks[0]["params"].items():
        assert torch.equal(v, ranks[1]["params"][k]), k  # ranks never drift apart
        torch.testing.assert_close(v, single["params"][k], rtol=1e-5, atol=1e-6)
    assert ranks[0]["schedule"] == single["schedule"]


def test_schedule_per_optimizer_step_with_accumulation(single, tmp_path):
    """2 processes x 2 accumulation steps: the lr/beta1 sequence of 1 process, per optimizer
    step (a prepared Accelerate scheduler steps num_processes times: accelerate #874)."""
    run = tmp_path / "run"
    launch(TINY, ["--output-dir", str(run), "--dump", str(tmp_path / "dump"), "--grad-accum", "2"],
           launcher="torchrun")
    ranks = dumps(tmp_path / "dump", 2)
    for d in ranks:
        assert len(d["seen"]) == 2 * 2 * STEPS_PER_EPOCH  # two micro-batches of 8 per step
        assert all(len(b) == 8 for b in d["seen"])
        assert d["schedule"] == single["schedule"]
        assert len(d["schedule"]) == 2 * STEPS_PER_EPOCH
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in logged if "lr" in r]
    assert lrs == [s["lr"] for s in single["schedule"]]
    for k, v in ranks[0]["params"].items():
        torch.testing.assert_close(v, single["params"][k], rtol=1e-5, atol=1e-6)


def test_accumulation_in_one_process_matches(single, tmp_path):
    launch(TINY, ["--output-dir", str(tmp_path / "run"), "--dump", str(tmp_path / "dump"),
                  "--grad-accum", "4"])
    d = dumps(tmp_path / "dump", 1)[0]
    for k, v in d["params"].items():
        torch.testing.assert_close(v, single["params"][k], rtol=1e-5, atol=1e-6)


def test_ranks_training_alone_is_an_error(tmp_path):
    """Without ACCELERATE_USE_CPU each torchrun rank would train alone: refuse, one line."""
    proc = launch(TINY, ["--output-dir", str(tmp_path / "run")], launcher="torchrun",
                  check=False, ACCELERATE_USE_CPU="false")
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if "each rank would train alone" in l]
    assert lines and all(l.startswith("error") and "WORLD_SIZE=2" in l for l in lines)


def test_resume_on_another_world_size(single, tmp_path):
    """Saved by 1 process, resumed by 2 (and the reverse): the same run, optimizer state
    included (data order depends on the global batch only; dropout is off here)."""
    launch(TINY, ["--output-dir", str(tmp_path / "two"), "--resume",
                  str(single["run"] / "checkpoints" / "step_7"), "--dump", str(tmp_path / "d2"),
                  "--checkpoint-every", "7"], launcher="torchrun")
    two = dumps(tmp_path / "d2", 2)
    for k, v in single["params"].items():
        torch.testing.assert_close(two[0]["params"][k], v, rtol=1e-5, atol=1e-6)
    proc = launch(TINY, ["--output-dir", str(tmp_path / "one"), "--resume",
                         str(tmp_path / "two" / "checkpoints" / "step_14"),
                         "--dump", str(tmp_path / "d1")])
    assert "saved with 2 processes, resumed with 1" in proc.stdout
    one = dumps(tmp_path / "d1", 1)[0]
    for k, v in single["params"].items():
        torch.testing.assert_close(one["params"][k], v, rtol=1e-5, atol=1e-6)
