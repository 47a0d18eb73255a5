"""The memory estimator: hand-computed cases, the ZeRO paper's Figure 1, orderings between
strategies, the ``toolkit memory`` command line, and the optimizer states real runs hold
(one process, and ZeRO-2/3 with 2 processes under torchrun)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, dumps, env, launch
from toolkit import parallel as strategy
from toolkit.cli import main
from toolkit.config import OptimConfig
from toolkit.errors import UserError
from toolkit.experiments.memory import CATEGORIES, estimate, parse_count
from toolkit.parallel import CONCRETE

ZERO = ("zero1", "zero2", "zero3", "zero2-offload", "zero3-offload")


def nonzero(est: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in est.items() if v and not k.endswith(".total")}


def test_hand_computed_zero3_bf16_amsgrad():
    # 1e9 params over 8 ranks: a 125M-element partition of each 16-bit weight and gradient
    # (2 bytes) and of the fp32 master, exp_avg, exp_avg_sq, max_exp_avg_sq (4 bytes each).
    part = 125_000_000
    est = estimate(10**9, "zero3", 8, "bf16", "adamw", amsgrad=True)
    assert nonzero(est) == {"device.params": 2 * part, "device.grads": 2 * part,
                            "device.master_params": 4 * part, "device.exp_avg": 4 * part,
                            "device.exp_avg_sq": 4 * part, "device.max_exp_avg_sq": 4 * part}
    assert est["device.total"] == 2_500_000_000 and est["cpu.total"] == 0
    # Offload: nothing persistent on the device; the partition of weights, an fp32 gradient
    # partition, master and states in the process's RAM.
    off = estimate(10**9, "zero3-offload", 8, "bf16", "adamw", amsgrad=True)
    assert off["device.total"] == 0
    assert nonzero(off) == {"cpu.params": 2 * part, "cpu.grads": 4 * part,
                            "cpu.master_params": 4 * part, "cpu.exp_avg": 4 * part,
                            "cpu.exp_avg_sq": 4 * part, "cpu.max_exp_avg_sq": 4 * part}


def test_hand_computed_other_cases():
    # DDP: fp32 everything everywhere, whatever the (autocast) precision: 16 bytes/param.
    assert nonzero(estimate(10**9, "ddp", 8, "bf16")) == {
        "device.params": 4 * 10**9, "device.grads": 4 * 10**9,
        "device.exp_avg": 4 * 10**9, "device.exp_avg_sq": 4 * 10**9}
    # ZeRO-2 offload with SGD: 16-bit weights stay whole on the device; momentum, master and
    # the fp32 gradient partition go to CPU.
    assert nonzero(estimate(800, "zero2-offload", 4, "fp16", "sgd")) == {
        "device.params": 1600, "cpu.grads": 800, "cpu.master_params": 800,
        "cpu.momentum_buffer": 800}
    # ZeRO-3 in fp32 without offload steps the parameters' own partition: no master copy;
    # stages 1-2 clone it even in fp32.
    assert estimate(1000, "zero3", 2)["device.master_params"] == 0
    assert estimate(1000, "zero1", 2)["device.master_params"] == 2000
    # An uneven split: the partition is rounded up (DeepSpeed pads).
    assert estimate(10, "zero3", 4)["device.exp_avg"] == 4 * 3
    # DDP: each process holds as much as one process alone, whatever world says.
    assert estimate(10**6, "ddp", 8) == estimate(10**6, "ddp", 1)


@pytest.mark.parametrize("name, gb", [("ddp", 120), ("zero1", 31.4), ("zero2", 16.6),
                                      ("zero3", 1.9)])
def test_zero_paper_figure_1(name, gb):
    # Rajbhandari et al. 2020, Figure 1: 7.5B parameters, 64 devices, mixed-precision Adam.
    est = estimate(7_500_000_000, name, 64, "fp16", "adam")
    assert round(est["device.total"] / 1e9, 1) == gb


@pytest.mark.parametrize("world", [2, 8, 1024])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("optimizer, amsgrad", [("adamw", False), ("adamw", True), ("sgd", False)])
def test_each_stage_shards_more(world, precision, optimizer, amsgrad):
    est = {s: estimate(7_340_032, s, world, precision, optimizer, amsgrad) for s in CONCRETE}
    dev = {s: e["device.total"] for s, e in est.items()}
    # SGD in fp32 over 2 ranks: zero1 (4+4+2+2 bytes/param) ties with DDP (4+4+4).
    assert dev["zero3"] < dev["zero2"] < dev["zero1"] <= dev["ddp"]
    assert dev["zero3-offload"] < dev["zero2-offload"] < dev["zero2"]
    # Offload moves the states, bytes unchanged, onto the CPU, with an fp32 master and
    # gradient partition (a master even in fp32, which zero3 on the device does without).
    part = -(-7_340_032 // world)
    for stage in ("zero2", "zero3"):
        on, off = est[stage], est[f"{stage}-offload"]
        for c in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
            assert off[f"device.{c}"] == 0 and off[f"cpu.{c}"] == on[f"device.{c}"]
        assert off["cpu.master_params"] == off["cpu.grads"] == 4 * part
        assert off["device.master_params"] == off["device.grads"] == 0
    assert all(est[s]["cpu.total"] == 0 for s in ("ddp", "zero1", "zero2", "zero3"))


@pytest.mark.parametrize("name", CONCRETE)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_amsgrad_adds_4_bytes_per_param_of_state(name, precision):
    n, world = 1_000_001, 4
    held = (1 if name == "ddp" else world)
    adamw = estimate(n, name, world, precision, "adamw")
    ams = estimate(n, name, world, precision, "adamw", amsgrad=True)
    extra = {k: ams[k] - adamw[k] for k in ams if ams[k] != adamw[k]}
    place = "cpu" if name.endswith("offload") else "device"
    assert extra == {f"{place}.max_exp_avg_sq": 4 * -(-n // held), f"{place}.total": 4 * -(-n // held)}
    assert ams[f"{place}.max_exp_avg_sq"] == ams[f"{place}.exp_avg_sq"]
    # Adam and AdamW differ in the update, not in what they store.
    assert estimate(n, name, world, precision, "adam") == adamw


@pytest.mark.parametrize("kwargs", [{"n_params": -5}, {"n_params": 0}, {"n_params": 1.5},
                                    {"strategy": "zero4"}, {"strategy": "fsdp"}, {"world": 0},
                                    # Not strategies a run has: "auto" resolves to one of them,
                                    # and one process is "ddp" at world 1.
                                    {"strategy": "auto"}, {"strategy": "single"},
                                    {"precision": "fp8"}, {"optimizer": "lamb"},
                                    {"optimizer": "muon"}, {"optimizer": "schedulefree-adamw"},
                                    {"optimizer": "sgd", "amsgrad": True}])
def test_bad_input_is_a_user_error(kwargs):
    args = {"n_params": 1000, "strategy": "zero2", "world": 2, **kwargs}
    with pytest.raises(UserError):
        estimate(**args)


def test_parse_count():
    assert parse_count("1.01e9") == 1_010_000_000
    assert parse_count("33556078") == 33_556_078
    for bad in ("-1e9", "0", "1.5", "abc", "inf", "nan"):
        with pytest.raises(UserError):
            parse_count(bad)


def test_cli_prints_the_table():
    proc = subprocess.run([sys.executable, "-m", "toolkit.cli", "memory", "--params", "1.01e9",
                           "--world", "8", "--precision", "bf16", "--optimizer", "adamw",
                           "--amsgrad"], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.strip()}
    assert set(CONCRETE) <= set(rows)
    header = proc.stdout.split("Per device")[1].splitlines()[1].split()
    assert header == ["strategy", "params", "grads", "master_params", "exp_avg", "exp_avg_sq",
                      "max_exp_avg_sq", "total"]
    # zero3: 20 bytes/param over 8 ranks = 2,525,000,000 B = 2.35 GiB; offload's CPU row.
    device = proc.stdout.split("Per process, CPU")[0]
    assert [line for line in device.splitlines() if line.startswith("zero3 ")][0].endswith(
        "2.35 GiB")
    cpu = proc.stdout.split("Per process, CPU")[1]
    assert [line for line in cpu.splitlines() if line.startswith("zero3-offload")][0].endswith(
        "2.59 GiB")
    assert "Not counted: activations" in proc.stdout


def test_cli_counts_a_toolkit_model(capsys):
    main(["memory", "--model", "awd-lstm", "--vocab", "33278", "--strategy", "ddp"])
    out = capsys.readouterr().out
    # AWDLSTM's docstring: 33.6M parameters with WikiText-2's vocabulary, tied weights once.
    assert "33,556,078 parameters" in out
    assert "zero2" not in out


@pytest.mark.parametrize("args", [["--params=-5"], ["--params", "1e6", "--strategy", "zero4"],
                                  ["--params", "1e6", "--world", "0"],
                                  ["--model", "recipes/digits.py"]])
def test_cli_bad_input_exits_2_with_one_line(args, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["memory", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def states(est: dict[str, int], place: str = "device") -> dict[str, int]:
    return {c: est[f"{place}.{c}"] for c in CATEGORIES
            if c not in ("params", "grads", "master_params") and est[f"{place}.{c}"]}


@pytest.mark.parametrize("name, amsgrad", [("adamw", False), ("adamw", True), ("adam", True),
                                           ("sgd", False)])
def test_one_process_holds_the_estimated_states(name, amsgrad):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = OptimConfig(name=name, amsgrad=amsgrad).build(model)
    model(torch.randn(8, 16)).square().mean().backward()
    opt.step()
    n = sum(p.numel() for p in model.parameters())
    assert strategy.optimizer_state_bytes(opt) == states(estimate(n, "ddp", 1, "fp32", name,
                                                                  amsgrad))


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_zero_ranks_hold_the_estimated_states(name, tmp_path):
    launch(TINY, ["--output-dir", str(tmp_path / "run"), "--dump", str(tmp_path / "dump"),
                  "--strategy", name, "--optim.amsgrad", "--max-steps", "3"], launcher="torchrun")
    ranks = dumps(tmp_path / "dump", 2)
    n = sum(v.numel() for v in ranks[0]["params"].values())
    expected = states(estimate(n, name, 2, "fp32", "adamw", amsgrad=True))
    assert set(expected) == {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    for d in ranks:
        assert set(d["optimizer_bytes"]) == set(expected)
        for k, v in expected.items():
            assert abs(d["optimizer_bytes"][k] - v) <= 0.05 * v, (k, d["optimizer_bytes"][k], v)
