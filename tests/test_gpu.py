"""On a CUDA device (``pytest -m gpu``): the kernels the toolkit picks there, fused and the
compiled step, against the float64 textbook rules of ``test_optim``, and the trainer's
fp16 (loss scaler) and bf16 paths. CI has no GPU; these run on a lent one."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import DIGITS, launch
from test_optim import BETA2, CASES, INIT, MAX_LR, STEPS, WD, grad, rel_err, run_textbook
from toolkit.optim import build_optimizer
from toolkit.schedule import OneCycle, beta1_of

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def run_cuda(name, amsgrad, nesterov, impl, dtype):
    params = {k: v.to("cuda", dtype).clone().requires_grad_() for k, v in INIT.items()}
    opt = build_optimizer(list(params.values()), name, MAX_LR[name], betas=(0.95, BETA2),
                          weight_decay=WD, amsgrad=amsgrad, nesterov=nesterov, impl=impl)
    sched, used = OneCycle(opt, STEPS), []
    for t in range(STEPS):
        group = opt.param_groups[0]
        used.append((float(group["lr"]), beta1_of(group)))
        for k, p in params.items():
            p.grad = grad(k, p.detach().cpu(), t).to(p.device)
        opt.step()
        sched.step()
    return {k: p.detach().cpu() for k, p in params.items()}, used


@pytest.mark.parametrize("impl", ["fused", "foreach", "compiled"])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] != "sgd"], ids=str)
def test_cuda_kernels_match_textbook(case, impl):
    got, used = run_cuda(*case, impl, torch.float32)
    assert rel_err(got, run_textbook(*case, used)) < 1e-4
    if impl == "fused":
        got64, used64 = run_cuda(*case, impl, torch.float64)
        assert rel_err(got64, run_textbook(*case, used64)) < 1e-10


def test_auto_is_fused_on_cuda():
    opt = build_optimizer([torch.zeros(3, device="cuda", requires_grad=True)], amsgrad=True)
    assert opt.impl == "fused"


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_digits_mixed_precision_on_gpu(precision, tmp_path):
    proc = launch(DIGITS, ["--output-dir", str(tmp_path), "--precision", precision,
                           "--no-progress"], timeout=600)
    results = json.loads((tmp_path / "results.json").read_text())
    assert "cuda" in proc.stdout and results["valid_accuracy"] >= 0.96, proc.stdout
    if precision == "fp16":  # the loss scaler is saved with the checkpoint
        assert (tmp_path / "checkpoints" / f"step_{results['step']}" / "scaler.pt").exists()


@pytest.mark.parametrize("name", ["fsdp2", "fsdp2-offload"])
def test_digits_fsdp2_bf16_on_gpu_resumes_on_one_process(name, tmp_path):
    """FSDP2 on CUDA (offload: parameters and states in CPU RAM), bf16, AMSGrad: it learns,
    and its checkpoint resumes in one process to the same end as the uninterrupted run."""
    args = ["--strategy", name, "--precision", "bf16", "--optim.amsgrad", "--no-progress",
            "--checkpoint-every", "20", "--keep-checkpoints", "20"]
    run = tmp_path / "run"
    proc = launch(DIGITS, ["--output-dir", str(run), *args], timeout=600)
    results = json.loads((run / "results.json").read_text())
    assert f"({name})" in proc.stdout and results["valid_accuracy"] >= 0.9, proc.stdout
    launch(DIGITS, ["--output-dir", str(tmp_path / "resumed"), *args, "--resume",
                    str(run / "checkpoints" / "step_100")], timeout=600)
    again = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert again["valid_accuracy"] == pytest.approx(results["valid_accuracy"], abs=0.01)
