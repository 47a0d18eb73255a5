"""fp16 on CPU (``--precision fp16``): torch's CPU autocast and ``GradScaler("cpu")``, which
Accelerate 1.15 leaves off there. A run equals a plain loop of autocast and the scaler; an
overflow skips its step and halves the scale; a resume restores the scaler."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, dumps, launch
from tiny import dataset, model
from toolkit.optim import param_groups

ARGS = ["--precision", "fp16", "--schedule.shape", "constant"]


def run(tmp, name, args):
    launch(TINY, ["--output-dir", str(tmp / name), "--dump", str(tmp / name), *ARGS, *args])
    return dumps(tmp / name, 1)[0]["params"]


def plain_loop(overflow_at: int = 0) -> dict:
    """tiny's 20 steps: forward under fp16 autocast, the loss in fp32, the scaled backward,
    scaler.step and update."""
    torch.manual_seed(0)
    net = model(0.0)
    opt = torch.optim.AdamW(param_groups(net, 0.1), lr=1e-2, betas=(0.95, 0.99),
                            weight_decay=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu")
    batches = dataset(320, 1, shuffle_seed=0).shard(batch_size=32, world=1, rank=0, accum=1,
                                                    device="cpu").batches(0)
    for step in range(1, 21):
        x, y, _ = next(batches)
        with torch.autocast("cpu", dtype=torch.float16):
            out = net(x)
        out = out.float()
        if step == overflow_at:
            out.register_hook(lambda g: torch.full_like(g, float("inf")))
        scaler.scale(F.cross_entropy(out, y)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    return {"params": net.state_dict(), "scale": scaler.get_scale()}


def scale(run_dir, step=20) -> float:
    return torch.load(run_dir / "checkpoints" / f"step_{step}" / "scaler.pt")["scale"]


def test_a_run_is_autocast_and_the_scaler_in_a_plain_loop(tmp_path):
    ours, ref = run(tmp_path, "fp16", []), plain_loop()
    for k, v in ref["params"].items():
        torch.testing.assert_close(ours[k], v, rtol=0, atol=0, msg=k)
    launch(TINY, ["--output-dir", str(tmp_path / "fp32"), "--dump", str(tmp_path / "fp32"),
                  "--schedule.shape", "constant"])
    fp32 = dumps(tmp_path / "fp32", 1)[0]["params"]
    assert not torch.equal(fp32["0.weight"], ours["0.weight"])  # autocast did something
    assert scale(tmp_path / "fp16") == ref["scale"] == 65536.0


def test_an_overflow_skips_its_step_and_halves_the_scale_and_a_resume_keeps_it(tmp_path):
    args = ["--overflow-at", "5", "--checkpoint-every", "1", "--keep-checkpoints", "30"]
    ours, ref = run(tmp_path, "whole", args), plain_loop(overflow_at=5)
    for k, v in ref["params"].items():
        torch.testing.assert_close(ours[k], v, rtol=0, atol=0, msg=k)
    assert not torch.equal(ref["params"]["0.weight"], plain_loop()["params"]["0.weight"])
    assert [scale(tmp_path / "whole", s) for s in (4, 5, 20)] == [65536.0, 32768.0, 32768.0]
    resumed = run(tmp_path, "resumed", [*args, "--resume",
                                        str(tmp_path / "whole" / "checkpoints" / "step_10")])
    for k, v in ours.items():
        assert torch.equal(resumed[k], v), k
    assert scale(tmp_path / "resumed") == 32768.0


def test_fp16_under_deepspeed_on_cpu_is_one_line(tmp_path):
    proc = launch(TINY, ["--output-dir", str(tmp_path), "--precision", "fp16", "--strategy",
                         "zero2"], check=False)
    assert proc.returncode == 2
    assert "fp16 under DeepSpeed needs a GPU" in proc.stderr.strip().splitlines()[-1]
