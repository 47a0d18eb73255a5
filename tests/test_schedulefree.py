"""Schedule-free AdamW (``--optim.name schedulefree-adamw``, the ``schedulefree`` package's
``AdamWScheduleFree``): the trainer's run equals a plain loop over the package's optimizer;
evaluation, checkpoints and the exported model use its averaged weights; a killed run
resumes exactly; 2 processes (DDP, FSDP2) equal one; ZeRO and a 1cycle are refused."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import DIGITS, TINY, dumps, launch
from test_resume import killed_tiny_resumes_exactly
from tiny import dataset, model
from toolkit.optim import param_groups

SF = ["--optim.name", "schedulefree-adamw", "--schedule.shape", "constant"]


def run(tmp, name, args, launcher="python"):
    launch(TINY, ["--output-dir", str(tmp / name), "--dump", str(tmp / f"{name}_d"), *SF, *args],
           launcher=launcher)
    return dumps(tmp / f"{name}_d", 2 if launcher != "python" else 1)


@pytest.mark.parametrize("args, warmup", [([], 0), (["--optim.warmup-pct", "0.25"], 5)])
def test_a_run_is_the_packages_optimizer_in_a_plain_loop(args, warmup, tmp_path):
    """tiny: 2 epochs of 10 steps, evaluated at steps 10 and 20 and saved at 20, each at
    the averaged weights (eval(), then train() again); a warm-up of a quarter of them."""
    import schedulefree

    ours = run(tmp_path, "ours", args)[0]
    torch.manual_seed(0)
    net = model(0.0)
    data = dataset(320, 1, shuffle_seed=0).shard(batch_size=32, world=1, rank=0, accum=1,
                                                 device="cpu")
    opt = schedulefree.AdamWScheduleFree(param_groups(net, 0.1), lr=1e-2, betas=(0.95, 0.99),
                                         eps=1e-8, weight_decay=0.1, foreach=True,
                                         warmup_steps=warmup)
    opt.train()
    batches = data.batches(0)
    for step in range(1, 21):
        x, y, _ = next(batches)
        F.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for _ in range({10: 1, 20: 2}.get(step, 0)):  # evaluations, and the final save
            opt.eval()
            opt.train()
    for k, v in net.state_dict().items():
        torch.testing.assert_close(ours["params"][k], v, rtol=0, atol=0, msg=k)


@pytest.mark.slow  # 17 s: CI runs it after the default run
def test_killed_then_resumed_equals_uninterrupted(tmp_path):
    killed_tiny_resumes_exactly(tmp_path, SF)


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp2", marks=pytest.mark.slow)])
def test_two_processes_equal_one(strategy, tmp_path):
    one = run(tmp_path, "one", [])[0]
    two = run(tmp_path, "two", ["--strategy", strategy], launcher="torchrun")
    for k, v in one["params"].items():
        torch.testing.assert_close(two[0]["params"][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_the_exported_model_is_the_average_and_scores_the_runs_accuracy(tmp_path):
    from recipes.digits import load_digits
    from toolkit.checkpoint import weights
    from toolkit.recipe import load_model

    out = tmp_path / "digits"
    launch(DIGITS, ["--output-dir", str(out), *SF, "--max-steps", "30", "--no-progress",
                    "--optim.lr", "3e-3"])
    results = json.loads((out / "results.json").read_text())
    net = load_model(out)
    _, test = load_digits(None)
    with torch.no_grad():
        hits = (net(test.tensors[0]).argmax(-1) == test.tensors[1]).sum().item()
    assert hits / len(test.tensors[1]) == results["valid_accuracy"]
    # The final checkpoint holds the averaged weights too (switched to them once more after
    # the save: eval() after train() is exact up to float rounding).
    saved = weights(out / "checkpoints" / f"step_{results['step']}")
    for k, v in net.state_dict().items():
        torch.testing.assert_close(saved[k], v, rtol=0, atol=1e-7, msg=k)


@pytest.mark.parametrize("args, says", [
    (["--optim.name", "schedulefree-adamw"], "run it with --schedule.shape constant"),
    ([*SF, "--strategy", "zero2"], "DeepSpeed steps flat copies"),
    ([*SF, "--optim.amsgrad"], "no AMSGrad"),
    (["--optim.warmup-steps", "5"], "is schedulefree-adamw's"),
    ([*SF, "--optim.warmup-steps", "5", "--optim.warmup-pct", "0.1"], "without --optim.warmup-steps"),
])
def test_what_it_cannot_do_is_one_line(args, says, tmp_path):
    proc = launch(TINY, ["--output-dir", str(tmp_path / "bad"), *args], check=False)
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr.strip().splitlines()[-1]
