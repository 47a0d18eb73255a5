"""A finished run leaves its trained model as one fp32 ``model.safetensors`` and the
``model.json`` that rebuilds it (``toolkit.recipe.load_model``): under DDP, ZeRO-2, ZeRO-3,
ZeRO-3 with offload and FSDP2, the reloaded model scores the run's own final test accuracy."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import DIGITS, launch
from recipes.digits import load_digits
from toolkit.errors import UserError
from toolkit.recipe import load_model


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3", "zero3-offload", "fsdp2"])
def test_the_weights_file_reloads_to_the_runs_accuracy(strategy, tmp_path):
    out = tmp_path / strategy
    launch(DIGITS, ["--output-dir", str(out), "--max-steps", "30", "--strategy", strategy,
                    "--no-progress"], launcher="torchrun", timeout=600)
    weights = load_file(out / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in weights.values())
    model = load_model(out)
    _, test = load_digits(None)
    with torch.no_grad():
        hits = (model(test.tensors[0]).argmax(-1) == test.tensors[1]).sum().item()
    results = json.loads((out / "results.json").read_text())
    assert hits / len(test.tensors[1]) == results["valid_accuracy"]
    assert json.loads((out / "model.json").read_text())["builder"] == "recipes.digits:convnet"


def test_a_folder_without_weights_is_one_line(tmp_path):
    with pytest.raises(UserError, match="not a finished run folder") as e:
        load_model(tmp_path)
    assert "\n" not in str(e.value)
