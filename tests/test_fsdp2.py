"""FSDP2 (torch's ``fully_shard``) with 2 real processes on CPU over gloo, against one plain
process: AdamW, AMSGrad, Adam-L2, SGD and clipping (Adam alone could not see a reduction
that sums instead of averaging: its update is the same for doubled gradients, pytorch#162338),
BatchNorm under --sync-batchnorm, sharded states, bf16, a killed run resumed, checkpoints
resumed on another number of processes with every optimizer state, the accelerate launch
config, and one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp

from conftest import ROOT, TINY, dumps, launch
from test_resume import kill_after
from toolkit import checkpoint
from toolkit.atomic import write_atomic
from toolkit.experiments.memory import estimate
from toolkit.parallel.fsdp2 import SHARDS, read_whole

N_PARAMS = 16 * 64 + 64 + 64 * 4 + 4  # tiny's MLP
# An optimizer that sees doubled gradients (a SUM reduction) differently: SGD, Adam-L2 with
# a real wd, clipping; and the post's two Adams.
CASES = {
    "adamw": [],
    "amsgrad": ["--optim.amsgrad"],
    "adam-l2": ["--optim.name", "adam", "--optim.wd", "0.1"],
    "sgd": ["--optim.name", "sgd", "--optim.lr", "0.1"],
    "adamw-clip": ["--clip", "0.05"],
}
TOL = dict(rtol=1e-5, atol=1e-6)


def run(tmp, name: str, args: list[str], launcher: str = "python", **kw) -> list[dict]:
    launch(TINY, ["--output-dir", str(tmp / name), "--dump", str(tmp / f"{name}_d"), *args],
           launcher=launcher, **kw)
    return dumps(tmp / f"{name}_d", 2 if launcher != "python" else 1)


def assert_close(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **(tol or TOL), msg=k)


SLOW = {"adamw", "adam-l2"}  # AMSGrad, SGD and clipping stay in the default run


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c
                                  for c in CASES])
def test_two_processes_equal_one_and_shard_the_states(case, tmp_path):
    flags = CASES[case]
    one = run(tmp_path, "one", flags)[0]
    two = run(tmp_path, "two", ["--strategy", "fsdp2", *flags], launcher="torchrun")
    assert two[0]["world"] == 2 and "MULTI_CPU" in two[0]["distributed_type"]
    assert_close(two[0]["params"], one["params"])  # gathered on the main process
    # Each rank holds half of every state (AMSGrad's max too), as toolkit memory says.
    states = ("momentum_buffer",) if case == "sgd" else \
        ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if case == "amsgrad" else ())
    est = estimate(N_PARAMS, "fsdp2", 2, optimizer="sgd" if case == "sgd" else "adamw",
                   amsgrad=case == "amsgrad")
    for d in two:
        assert d["optimizer_bytes"] == {s: est[f"device.{s}"] for s in states}
    assert one["optimizer_bytes"] == {s: 2 * est[f"device.{s}"] for s in states}


@pytest.mark.slow  # 14 s: CI runs it after the default run (it checks the parity test)
def test_a_summed_gradient_would_fail_the_sgd_parity(tmp_path):
    """What a SUM in place of AVG does to SGD: the step of doubled gradients, i.e. twice
    the lr. It moves the weights 100x past the parity tolerance."""
    a = run(tmp_path, "a", CASES["sgd"])[0]["params"]
    b = run(tmp_path, "b", ["--optim.name", "sgd", "--optim.lr", "0.2"])[0]["params"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 100 * TOL["atol"]


def test_batchnorm_under_sync_batchnorm_equals_one_process(tmp_path):
    one = run(tmp_path, "one", ["--batchnorm"])[0]
    two = run(tmp_path, "two", ["--batchnorm", "--sync-batchnorm", "--strategy", "fsdp2"],
              launcher="torchrun")
    assert any("running_mean" in k for k in one["params"])
    assert_close(two[0]["params"], one["params"])


def test_batchnorm_without_sync_is_ddps_rank_0_statistics(tmp_path):
    """Without --sync-batchnorm each rank normalizes its own micro-batch and the running
    statistics are rank 0's, under FSDP2 as under DDP (which broadcasts them at each
    forward): the same weights and buffers, on every rank, in the checkpoint too."""
    every = ["--batchnorm", "--checkpoint-every", "10"]
    ddp = run(tmp_path, "ddp", every, launcher="torchrun")
    fsdp2 = run(tmp_path, "fsdp2", [*every, "--strategy", "fsdp2"], launcher="torchrun")
    assert_close(fsdp2[0]["params"], ddp[0]["params"])
    # Each rank evaluates with rank 0's statistics (rank 1's own would score otherwise).
    for key in ("valid_loss", "valid_accuracy"):
        assert fsdp2[0]["result"][key] == pytest.approx(ddp[0]["result"][key], rel=1e-5)
    saved = read_whole(tmp_path / "fsdp2" / "checkpoints" / "step_10", "model.")
    want = checkpoint.weights(tmp_path / "ddp" / "checkpoints" / "step_10")
    assert any("running_var" in k for k in saved)
    assert_close(saved, want)


@pytest.mark.slow
def test_bf16_two_processes_equal_one(tmp_path):
    """bf16 compute (FSDP2's mixed precision): another split of the batch rounds
    differently (measured: 4e-3 on weights of ~0.2 after 20 Adam steps, the same valid loss
    to 2e-5), while fp32 differs visibly: the policy is in effect."""
    fp32 = run(tmp_path, "fp32", ["--strategy", "fsdp2"])[0]
    one = run(tmp_path, "one", ["--strategy", "fsdp2", "--precision", "bf16"])[0]
    two = run(tmp_path, "two", ["--strategy", "fsdp2", "--precision", "bf16"],
              launcher="torchrun")
    assert_close(two[0]["params"], one["params"], rtol=0, atol=1e-2)
    assert two[0]["result"]["valid_loss"] == pytest.approx(one["result"]["valid_loss"], rel=1e-3)
    assert train_loss_gap(fp32, one) > 1e-3


def train_loss_gap(a: dict, b: dict) -> float:
    return abs(a["result"]["train_loss"] - b["result"]["train_loss"])


def optimizer_states(folder) -> dict[str, torch.Tensor]:
    return read_whole(folder, "optim.state.")


def test_resume_on_another_world_keeps_every_state(tmp_path):
    """2 -> 1 and 1 -> 2 processes: the final weights and every optimizer state (steps,
    moments, AMSGrad's max) of the resumed run equal the uninterrupted run's."""
    args = ["--strategy", "fsdp2", "--optim.amsgrad", "--checkpoint-every", "7",
            "--keep-checkpoints", "5"]
    for first, then in (("torchrun", "python"), ("python", "torchrun")):
        ref = run(tmp_path, f"ref_{first}", args, launcher=first)[0]
        ckpt = tmp_path / f"ref_{first}" / "checkpoints"
        resumed = run(tmp_path, f"resumed_{first}",
                      [*args, "--resume", str(ckpt / "step_7")], launcher=then)[0]
        assert_close(resumed["params"], ref["params"])
        got = optimizer_states(tmp_path / f"resumed_{first}" / "checkpoints" / "step_20")
        want = optimizer_states(ckpt / "step_20")
        assert sum(k.endswith("max_exp_avg_sq") for k in want) == 4
        assert_close(got, want)


def zero_the_max(folder) -> None:
    """Rewrite a checkpoint's DCP shards with AMSGrad's max zeroed, its marker updated."""
    whole = folder.parent / "whole.pt"
    dcp_to_torch_save(str(folder / SHARDS), str(whole))
    state = torch.load(whole, weights_only=False)
    for s in state["optim"]["state"].values():
        s["max_exp_avg_sq"].zero_()
    torch.save(state, whole)
    for f in (folder / SHARDS).iterdir():
        f.unlink()
    torch_save_to_dcp(str(whole), str(folder / SHARDS))
    marker = checkpoint.read_marker(folder)
    marker["files"] = checkpoint.checksums(folder)
    write_atomic(folder / checkpoint.MARKER, json.dumps(marker))


@pytest.mark.slow  # 13 s: CI runs it after the default run (it checks the test above)
def test_a_zeroed_max_fails_that_comparison(tmp_path):
    args = ["--strategy", "fsdp2", "--optim.amsgrad", "--checkpoint-every", "7",
            "--keep-checkpoints", "5"]
    ref = run(tmp_path, "ref", args, launcher="torchrun")[0]
    ckpt = tmp_path / "ref" / "checkpoints"
    zero_the_max(ckpt / "step_7")
    resumed = run(tmp_path, "resumed", [*args, "--resume", str(ckpt / "step_7")])[0]
    with pytest.raises(AssertionError):
        assert_close(resumed["params"], ref["params"])
    with pytest.raises(AssertionError):
        assert_close(optimizer_states(tmp_path / "resumed" / "checkpoints" / "step_20"),
                     optimizer_states(ckpt / "step_20"))


@pytest.mark.slow  # 24 s: CI runs it after the default run
def test_killed_then_resumed_equals_uninterrupted(tmp_path):
    args = ["--strategy", "fsdp2", "--optim.amsgrad", "--dropout", "0.3", "--epochs", "3",
            "--checkpoint-every", "1", "--keep-checkpoints", "3"]
    ref = run(tmp_path, "ref", args, launcher="torchrun")
    out = tmp_path / "run"
    kill_after(out, args, "torchrun", 14)
    resumed = launch(TINY, [*args, "--output-dir", str(out), "--resume", "auto", "--dump",
                            str(tmp_path / "dump")], launcher="torchrun")
    assert "resumed from" in resumed.stdout
    for a, b in zip(dumps(tmp_path / "dump", 2), ref):
        for k, v in b["params"].items():
            assert torch.equal(a["params"][k], v), k


def test_the_accelerate_config_runs_fsdp2(tmp_path):
    one = run(tmp_path, "one", ["--optim.amsgrad"])[0]
    proc = launch(TINY, ["--output-dir", str(tmp_path / "two"), "--dump",
                         str(tmp_path / "two_d"), "--optim.amsgrad"], launcher="accelerate",
                  config=ROOT / "launch" / "cpu-fsdp2.yaml")
    assert "on 2 process(es), MULTI_CPU (fsdp2)" in proc.stdout
    assert_close(dumps(tmp_path / "two_d", 2)[0]["params"], one["params"])
    for name in ("fsdp2.yaml", "cpu-fsdp2.yaml"):
        assert yaml.safe_load((ROOT / "launch" / name).read_text())["fsdp_config"][
            "fsdp_version"] == 2


@pytest.fixture(scope="module")
def two_layouts(tmp_path_factory) -> dict[str, Path]:
    """A ZeRO-2 and an FSDP2 checkpoint of tiny, after 2 steps."""
    out = {}
    for name in ("zero2", "fsdp2"):
        run_dir = tmp_path_factory.mktemp("layouts") / name
        launch(TINY, ["--output-dir", str(run_dir), "--strategy", name, "--max-steps", "2",
                      "--checkpoint-every", "2"])
        out[name] = run_dir / "checkpoints" / "step_2"
    return out


@pytest.mark.parametrize("args, says", [
    (["--strategy", "fsdp2-offload"], "--strategy fsdp2-offload needs a GPU"),
    (["--strategy", "fsdp2", "--resume", "{zero2}"], "saved under zero2 and this run uses fsdp2"),
    (["--strategy", "zero2", "--resume", "{fsdp2}"], "saved under fsdp2 and this run uses zero2"),
])
def test_bad_combinations_are_one_line(args, says, two_layouts, tmp_path):
    args = [a.format(**two_layouts) for a in args]
    proc = launch(TINY, ["--output-dir", str(tmp_path / "bad"), *args], check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and says in lines[-1], proc.stderr
