"""FSDP2 (torch's ``fully_shard``, what torchtitan is built on) as a
:class:`~toolkit.parallel.base.Strategy`.

Each parameter becomes a DTensor sharded over the processes (dim 0), so any torch
optimizer's states are sharded with it, AMSGrad's ``max_exp_avg_sq`` included. A forward
all-gathers one block's parameters at a time and a backward reduce-scatters its gradients
(averaged over ranks). The blocks are the model's direct children that own parameters and
share none with another child (a weight tied across children stays with the root), then
the root. ``bf16`` is FSDP2's mixed precision (bf16 compute, fp32 sharded weights and
gradient reduction) rather than autocast.

Checkpoints are torch's distributed checkpoint (DCP) of the model and optimizer state
dicts in ``fsdp2/`` beside Accelerate's files (schedule, RNG): DCP reshards on load, so a
checkpoint resumes on any number of processes, optimizer states included.

``fsdp2-offload`` keeps parameters, gradients and optimizer states in CPU RAM and steps
there (``CPUOffloadPolicy``); it needs a GPU (on a CPU-only machine everything already
lives in CPU RAM, and torch's policy pins memory through CUDA).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_state_dict)

from toolkit.errors import UserError
from toolkit.optim import orthogonalizes
from toolkit.parallel.base import Estimate, Strategy, empty_estimate

SHARDS = "fsdp2"  # the DCP folder inside a checkpoint


def blocks(model: nn.Module) -> list[nn.Module]:
    """The children of ``model`` to shard as units: those with parameters of their own
    that no other child shares (a tied embedding/decoder stays with the root)."""
    owners: dict[int, int] = {}
    children = list(model.children())
    for child in children:
        for p in child.parameters():
            owners[id(p)] = owners.get(id(p), 0) + 1
    return [c for c in children if any(True for _ in c.parameters())
            and all(owners[id(p)] == 1 for p in c.parameters())]


def read_whole(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's DCP shards whose flat key starts with ``prefix``
    (``model.``: the weights; ``optim.state.``: every optimizer state), whole, read in one
    process."""
    meta = dcp.FileSystemReader(str(folder / SHARDS)).read_metadata().state_dict_metadata
    state = {key: torch.empty(m.size, dtype=m.properties.dtype) for key, m in meta.items()
             if key.startswith(prefix) and hasattr(m, "chunks")}  # tensors, not bytes
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(folder / SHARDS), no_dist=True)
    return {key.removeprefix(prefix): value for key, value in state.items()}


class FSDP2(Strategy):
    """``fully_shard`` per block, then the root; ``fsdp2-offload`` with CPU offload."""

    layout = "fsdp2"

    def __init__(self, name: str, user_config: dict | None = None):
        super().__init__(name, user_config)
        self.offload = name.endswith("-offload")
        self.precision = "fp32"

    def prepare_env(self, world: int) -> None:
        if not torch.cuda.is_available() and world > 1:
            os.environ.setdefault("ACCELERATE_USE_CPU", "true")  # MULTI_CPU over gloo

    def check(self, *, precision, clip, freezes, device) -> None:
        if precision == "fp16":
            raise UserError("--strategy fsdp2 trains in bf16 or fp32 (fp16 would need a sharded "
                            "loss scaler); use --precision bf16")
        if self.offload and device.type != "cuda":
            raise UserError(f"--strategy {self.name} needs a GPU: on {device.type} the parameters "
                            "and optimizer states already live in CPU RAM; use --strategy fsdp2")
        self.precision = precision

    def compile(self, model, mode) -> None:
        # torchtitan's way: each block compiled, then sharded; the root's all-gathers and
        # the parts outside the blocks stay eager. Its forward, not the module: dynamo runs
        # a compiled __call__ of a module that fully_shard wraps eagerly (0 graphs).
        for block in blocks(model):
            block.forward = torch.compile(block.forward, mode=mode)

    def prepare(self, accelerator, model, build_optimizer) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        self.accelerator = accelerator
        device = accelerator.device
        # torch 2.14 warns at every forward whose output is a view (the language model's
        # log-probabilities): a hazard only for in-place ops on it, which the loop never does.
        warnings.filterwarnings("ignore", "FSDP2-wrapped module .* returned a view tensor")
        if not dist.is_initialized():  # one process without a launcher: a world of one
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    store=dist.HashStore(), rank=0, world_size=1)
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        options = {"mesh": mesh}
        if self.precision == "bf16":
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                        reduce_dtype=torch.float32)
        if self.offload:
            options["offload_policy"] = CPUOffloadPolicy()
        model.to(device)
        for block in blocks(model):
            fully_shard(block, **options)
        self.model = fully_shard(model, **options)
        self.optimizer = build_optimizer(self.model)  # over the sharded (DTensor) parameters
        if orthogonalizes(self.optimizer):
            raise UserError(f"--strategy {self.name} with muon: each process holds rows of "
                            "every weight matrix, and Newton-Schulz needs whole ones; use ddp")

    def sync_buffers(self) -> None:
        # FSDP2 shards parameters only: without --sync-batchnorm each rank would keep its own
        # running statistics. DDP's rule: rank 0's, before each training forward.
        if dist.get_world_size() > 1:
            for buffer in self.model.buffers():
                dist.broadcast(buffer, 0)

    def forward_backward(self, loss_of, last):
        self.sync_buffers()
        # Gradients are reduce-scattered only on the last micro-batch of the step.
        self.model.set_requires_gradient_sync(last)
        loss = loss_of()
        (loss / self.grad_accum).backward()
        return loss

    def step(self, clip) -> None:
        if clip is not None:
            # The norm of the sharded gradients is the whole gradient's (DTensor reduces it).
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def unwrapped(self) -> nn.Module:
        return self.model

    def hard_exit(self) -> bool:
        return True  # a process group runs even in one process

    def scoring_model(self) -> nn.Module:
        return self.model  # its forward all-gathers the sharded parameters

    # torch's get_state_dict/set_state_dict fill an optimizer without state by stepping it
    # once at lr 0 on zero gradients: a fresh Adam (a new stage's) would then take its first
    # real step as its second, 0.72 of its size. ``fresh`` records that there was no state,
    # and the state made for the save is dropped again.
    def save(self, folder: Path) -> None:
        # The collective part first: a rank that fails its own files afterwards (a full disk)
        # leaves no other waiting in DCP's collectives.
        self.sync_buffers()
        fresh = not self.optimizer.state
        model, optim = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model, "optim": optim, "fresh": torch.tensor(fresh)},
                 checkpoint_id=str(folder / SHARDS))
        if fresh:
            self.optimizer.state.clear()
        self.accelerator.save_state(str(folder))  # the schedule's state and the RNG

    def load(self, folder: Path) -> None:
        self.accelerator.load_state(str(folder))
        model, optim = get_state_dict(self.model, self.optimizer)
        state = {"model": model, "optim": optim, "fresh": torch.tensor(False)}
        dcp.load(state, checkpoint_id=str(folder / SHARDS))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        if state["fresh"]:
            self.optimizer.state.clear()

    def full_state_dict(self):
        self.sync_buffers()
        return get_model_state_dict(self.model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))

    @staticmethod
    def checkpoint_weights(folder: Path) -> dict[str, torch.Tensor] | None:
        return read_whole(folder, "model.") if (folder / SHARDS).is_dir() else None

    @classmethod
    def memory(cls, name, n_params, world, precision, states) -> Estimate:
        # Sharded fp32 weights, gradients and states; bf16 copies exist only while a block
        # is gathered (not counted, like activations).
        out, part = empty_estimate(), -(-n_params // world)
        place = "cpu" if name.endswith("-offload") else "device"
        out[f"{place}.params"] = out[f"{place}.grads"] = 4 * part
        for s in states:
            out[f"{place}.{s}"] = 4 * part
        return out
