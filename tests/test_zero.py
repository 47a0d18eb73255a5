"""DeepSpeed ZeRO with 2 real processes on CPU (gloo, DS_ACCELERATOR=cpu): parity with one
plain process, sharded AdamW/AMSGrad states, the 1cycle values read from inside the engine,
exact resume, the LR finder, and the launch configs. The heaviest cases are ``slow``:
``pytest -m slow tests/test_zero.py`` runs every stage with AdamW and AMSGrad."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import CPU_2PROC, DIGITS, ROOT, TINY, dumps, launch
from toolkit import parallel as strategy
from toolkit.parallel import zero
from toolkit.errors import UserError

FAST = [("zero2", True), ("zero3", True)]
SLOW = [("zero1", True), ("zero2-offload", True), ("zero3-offload", True),
        ("zero1", False), ("zero2", False), ("zero3", False), ("zero2-offload", False),
        ("zero3-offload", False)]
CASES = FAST + [pytest.param(*c, marks=pytest.mark.slow) for c in SLOW]
N_PARAMS = 16 * 64 + 64 + 64 * 4 + 4  # tiny's MLP


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One plain process per optimizer variant: the reference."""
    out = {}
    for amsgrad in (False, True):
        d = tmp_path_factory.mktemp(f"single_{amsgrad}")
        flag = ["--optim.amsgrad"] if amsgrad else []
        launch(TINY, ["--output-dir", str(d / "run"), "--dump", str(d / "dump"), *flag])
        out[amsgrad] = dumps(d / "dump", 1)[0]
    return out


def test_amsgrad_visibly_differs_on_this_problem(single):
    diffs = [(single[True]["params"][k] - v).abs().max().item()
             for k, v in single[False]["params"].items()]
    assert max(diffs) > 1e-4  # 100x the parity tolerance: a silent downgrade would show


def test_deepspeed_launcher_runs_zero2_like_one_process(single, tmp_path):
    """``deepspeed --num_gpus 2 recipe.py`` (it passes --local_rank=N) trains 2 ranks."""
    proc = launch(TINY, ["--output-dir", str(tmp_path / "run"), "--dump", str(tmp_path / "dump"),
                         "--strategy", "zero2", "--optim.amsgrad"], launcher="deepspeed")
    assert "DEEPSPEED (zero2)" in proc.stdout and "on 2 process(es)" in proc.stdout
    for d in dumps(tmp_path / "dump", 2):
        assert d["world"] == 2
        for k, v in single[True]["params"].items():
            torch.testing.assert_close(d["params"][k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, amsgrad", CASES)
def test_zero_matches_one_process_and_shards_states(name, amsgrad, single, tmp_path):
    run = tmp_path / "run"
    flag = ["--optim.amsgrad"] if amsgrad else []
    proc = launch(TINY, ["--output-dir", str(run), "--dump", str(tmp_path / "dump"), "--strategy",
                         name, "--checkpoint-every", "7", "--keep-checkpoints", "5", *flag],
                  launcher="torchrun")
    assert f"DEEPSPEED ({name})" in proc.stdout
    ranks, ref = dumps(tmp_path / "dump", 2), single[amsgrad]
    for d in ranks:
        for k, v in ref["params"].items():
            torch.testing.assert_close(d["params"][k], v, rtol=1e-5, atol=1e-6)
        # lr and beta1 read each step from the torch optimizer inside the engine.
        assert d["schedule"] == ref["schedule"]
    # Each rank holds half of every state: AMSGrad's max_exp_avg_sq too.
    keys = {"exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())
    for d in ranks:
        assert set(d["optimizer_bytes"]) == keys
        for k in keys:
            assert abs(d["optimizer_bytes"][k] - 4 * N_PARAMS / 2) <= 0.05 * 4 * N_PARAMS / 2
    assert ref["optimizer_bytes"] == {k: 4 * N_PARAMS for k in keys}

    # Exact resume: from step 7 (mid-epoch) to the end equals the uninterrupted run.
    resumed = tmp_path / "resumed"
    launch(TINY, ["--output-dir", str(resumed), "--dump", str(tmp_path / "dump_r"), "--strategy",
                  name, "--resume", str(run / "checkpoints" / "step_7"), *flag], launcher="torchrun")
    for a, b in zip(dumps(tmp_path / "dump_r", 2), ranks):
        for k, v in b["params"].items():
            assert torch.equal(a["params"][k], v), k
    # Another world size: the shards are re-cut for 1 process, optimizer state included.
    launch(TINY, ["--output-dir", str(tmp_path / "one"), "--dump", str(tmp_path / "dump_1"),
                  "--strategy", name, "--resume", str(run / "checkpoints" / "step_7"), *flag])
    for k, v in ref["params"].items():
        torch.testing.assert_close(dumps(tmp_path / "dump_1", 1)[0]["params"][k], v,
                                   rtol=1e-5, atol=1e-6)
    # Another ZeRO stage: refused in one line.
    other = "zero3" if name.startswith("zero2") else "zero2"
    proc = launch(TINY, ["--output-dir", str(tmp_path / "other"), "--strategy", other,
                         "--resume", str(run / "checkpoints" / "step_7"), *flag], check=False)
    assert proc.returncode == 2
    assert "resume with the strategy it was saved with" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("name, amsgrad", CASES)
def test_zero_checkpoint_of_one_process_resumes_on_two(name, amsgrad, single, tmp_path):
    """1 -> 2 processes: each rank takes its half of the saved optimizer state. The states
    after 7 steps differ between AdamW and AMSGrad (see the test above), so a lost or zeroed
    max_exp_avg_sq would move the result by ~1e-4, 100x the tolerance."""
    flag = ["--optim.amsgrad"] if amsgrad else []
    run = tmp_path / "run"
    launch(TINY, ["--output-dir", str(run), "--strategy", name, "--checkpoint-every", "7",
                  "--keep-checkpoints", "5", *flag])
    launch(TINY, ["--output-dir", str(tmp_path / "two"), "--dump", str(tmp_path / "dump"),
                  "--strategy", name, "--resume", str(run / "checkpoints" / "step_7"), *flag],
           launcher="torchrun")
    for d in dumps(tmp_path / "dump", 2):
        for k, v in single[amsgrad]["params"].items():
            torch.testing.assert_close(d["params"][k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["zero2", pytest.param("zero3", marks=pytest.mark.slow)])
def test_lr_finder_under_zero_leaves_no_trace(name, tmp_path):
    launch(TINY, ["--output-dir", str(tmp_path / "a"), "--strategy", name, "--optim.amsgrad",
                  "--dump", str(tmp_path / "a_d")], launcher="torchrun")
    launch(TINY, ["--output-dir", str(tmp_path / "b"), "--strategy", name, "--optim.amsgrad",
                  "--lr-find", "--then-fit", "--dump", str(tmp_path / "b_d")], launcher="torchrun")
    a, b = dumps(tmp_path / "a_d", 2), dumps(tmp_path / "b_d", 2)
    assert b[0]["result"]["steps"] == b[1]["result"]["steps"] > 5
    for k, v in a[0]["params"].items():
        assert torch.equal(b[0]["params"][k], v), k
    assert json.loads((tmp_path / "b" / "lr_find.json").read_text())["suggestions"]


def test_digits_with_amsgrad_under_the_zero2_yaml(tmp_path):
    proc = launch(DIGITS, ["--output-dir", str(tmp_path), "--optim.amsgrad", "--max-steps", "30",
                           "--no-progress"], launcher="accelerate",
                  config=str(ROOT / "launch" / "cpu-zero2.yaml"))
    assert "2 process(es), DEEPSPEED (zero2)" in proc.stdout and "amsgrad" in proc.stdout
    assert "test accuracy" in proc.stdout


def test_every_launch_yaml_loads_and_names_what_exists():
    yamls = sorted((ROOT / "launch").glob("*.yaml"))
    assert len(yamls) >= 10
    for path in yamls:
        cfg = yaml.safe_load(path.read_text())
        assert cfg["distributed_type"] in ("NO", "MULTI_GPU", "DEEPSPEED", "FSDP"), path
        if cfg["distributed_type"] == "FSDP":
            assert cfg["fsdp_config"]["fsdp_version"] == 2, path
        assert cfg["num_processes"] >= 1 and cfg["num_machines"] >= 1
        ds = cfg.get("deepspeed_config", {})
        if "deepspeed_config_file" in ds:
            user = zero.load_json(ROOT / ds["deepspeed_config_file"])
            # Every template merges cleanly into a generated config.
            stage = user["zero_optimization"]["stage"]
            offload = "offload_optimizer" in user["zero_optimization"]
            merged = zero.deepspeed_config(stage, offload, micro_batch=4, grad_accum=2,
                                           world=8, clip=1.0, precision="bf16", user=user)
            assert merged["train_batch_size"] == 64 and merged["bf16"]["enabled"] is True
    assert CPU_2PROC in yamls


def test_user_json_conflicts_are_one_line_errors():
    ours = zero.deepspeed_config(2, False, micro_batch=8, grad_accum=1, world=2, clip=None,
                                 precision="fp32")
    assert ours["train_batch_size"] == 16 and ours["zero_force_ds_cpu_optimizer"] is False
    merged = zero.merge(ours, {"zero_optimization": {"overlap_comm": True, "stage": "auto"}})
    assert merged["zero_optimization"] == {"stage": 2, "elastic_checkpoint": True,
                                           "overlap_comm": True}
    with pytest.raises(UserError, match=r"train_micro_batch_size_per_gpu=4 .* gives 8"):
        zero.merge(ours, {"train_micro_batch_size_per_gpu": 4})
    with pytest.raises(UserError, match=r"zero_optimization.stage=3"):
        zero.merge(ours, {"zero_optimization": {"stage": 3}})
    with pytest.raises(UserError, match="unknown"):
        strategy.check_name("zero4")


def test_a_deepspeed_optimizer_section_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}))
    with pytest.raises(UserError, match="'optimizer' section"):
        zero.load_json(path)


def test_strategy_flag_contradicting_the_launcher_is_an_error(tmp_path):
    proc = launch(TINY, ["--output-dir", str(tmp_path), "--strategy", "zero3"],
                  launcher="accelerate", config=str(ROOT / "launch" / "cpu-zero2.yaml"), check=False)
    assert proc.returncode != 0
    assert "--strategy zero3 contradicts the launcher's DeepSpeed config (zero2)" in proc.stderr
