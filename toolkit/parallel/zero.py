"""DeepSpeed ZeRO 1/2/3 and CPU offload as a :class:`~toolkit.parallel.base.Strategy`: its
config, its environment, its checkpoints, and our patches of its loader. The one module of
the toolkit written against DeepSpeed (0.19.8, through Accelerate 1.15 and torch 2.14).
(Not ``parallel/deepspeed.py``: a module of that name would shadow the package in some
import styles.)

**Config.** The DeepSpeed config is *generated* from the toolkit's own settings
(micro-batch, accumulation, clipping, precision, stage, offload), so the two can never
disagree; a user's DeepSpeed JSON (``--deepspeed-config`` or the one an Accelerate YAML
names) is merged in, and a key that contradicts the toolkit stops the run with a one-line
error.

Our optimizers stay ours under ZeRO: DeepSpeed wraps the client torch optimizer (fused
AdamW/Adam, AMSGrad included) around its flat fp32 partitions, so AMSGrad's
``max_exp_avg_sq`` is sharded like ``exp_avg``. ``zero_force_ds_cpu_optimizer`` is off:
with offload, Accelerate and DeepSpeed would otherwise swap in ``DeepSpeedCPUAdam``, which
has no AMSGrad (0.19.8 raises; older releases ignored it silently) and copies only lr and
weight decay. DeepSpeed's CPU kernel is ``--optim.impl deepspeed`` (``toolkit.cpu_adam``:
torch's state, every group's betas and eps).

**Environment.** On CPU, DeepSpeed's ops and comm need ``DS_ACCELERATOR=cpu``, and its
process group must be gloo, named explicitly, or Accelerate reports one process. A plain
``python recipe.py --strategy zero2`` (no launcher) gets a world of one on this host, else
DeepSpeed goes looking for MPI.

**Frozen layer groups.** An engine fixes the parameters it steps when it is built, so a
stage's frozen groups keep their gradients and are stepped at lr 0: the same weights, the
backward pass through them spent (and ``--clip`` would count their gradients: refused).

**Checkpoints on another world size.** DeepSpeed 0.19.8 refuses a ZeRO checkpoint of another
data-parallel world, and its universal conversion keeps only ``exp_avg``/``exp_avg_sq``.
:func:`any_world` replaces the engine's shard loading with one that re-cuts the flat fp32
weights and *every* optimizer state (AMSGrad's ``max_exp_avg_sq`` included) for this world.
Another ZeRO stage's checkpoint does not fit: its :attr:`ZeRO.layout` differs.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import itertools
import json
import os
import socket
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from accelerate.utils import DeepSpeedPlugin

from toolkit.errors import UserError
from toolkit.optim import orthogonalizes, schedule_free
from toolkit.parallel.base import Estimate, Strategy, empty_estimate


# ---- the generated config --------------------------------------------------------------
def load_json(path: str | Path) -> dict:
    """A user's DeepSpeed JSON; one without an ``optimizer`` or ``scheduler`` section."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"DeepSpeed config {path} could not be read: {e}") from None
    for key in ("optimizer", "scheduler"):
        if key in config:
            # DeepSpeed would build its own (FusedAdam/CPUAdam: no AMSGrad) in place of ours.
            raise UserError(f"DeepSpeed config {path} has an {key!r} section; the toolkit sets "
                            f"the optimizer and 1cycle with --optim.* and --schedule.*: remove it")
    return config


def from_launcher() -> tuple[int, bool, dict | None] | None:
    """``(stage, offload, user JSON)`` an ``accelerate launch`` DeepSpeed config asked for, or
    None. Also drops Accelerate's ``ACCELERATE_CONFIG_DS_FIELDS`` (see the comment)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    user = None
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path != "none":
        user = load_json(path)
        zero = user.get("zero_optimization", {})
        stage = zero.get("stage", 2)
        offload = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    else:
        stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
        offload = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") != "none"
    # The launcher's settings are folded into the generated config now; Accelerate would
    # refuse our config beside the YAML's fields (it cannot know they agree).
    os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
    if stage not in (1, 2, 3) or (offload and stage == 1):
        raise UserError(f"the launcher asks for ZeRO stage {stage}"
                        f"{' with offload' if offload else ''}; the toolkit runs stages 1, 2, 3 "
                        "and offload with stages 2 and 3")
    return stage, offload, user


def deepspeed_config(stage: int, offload: bool, *, micro_batch: int, grad_accum: int, world: int,
                     clip: float | None, precision: str, user: dict | None = None) -> dict:
    """The DeepSpeed JSON for a toolkit run, ``user``'s extra keys merged in."""
    # Stages 1/2 save their optimizer shards unpadded ("elastic"), so that a checkpoint can be
    # re-cut for another number of processes (any_world).
    zero: dict = {"stage": stage, **({"elastic_checkpoint": True} if stage < 3 else {})}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world,
        "gradient_clipping": clip or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # Keep the client torch optimizer (fused, AMSGrad) under offload: see module doc.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    return merge(config, user or {})


def merge(ours: dict, user: dict, prefix: str = "") -> dict:
    """``ours`` plus ``user``'s keys; ``"auto"`` takes ours; a different value is an error."""
    out = dict(ours)
    for key, value in user.items():
        name = prefix + key
        if key not in ours or value == "auto":
            if key not in ours:
                out[key] = value
            continue
        if isinstance(value, dict) and isinstance(ours[key], dict):
            out[key] = merge(ours[key], value, name + ".")
        elif value != ours[key]:
            raise UserError(f"DeepSpeed config sets {name}={json.dumps(value)} but the toolkit "
                            f"config gives {json.dumps(ours[key])}; set it through the toolkit's "
                            "flags or write \"auto\"")
    return out


def gathered(model, params: Iterable[torch.Tensor]):
    """A context in which ``params`` of a ZeRO-3 engine ``model`` are whole on every rank (a
    no-op for other models); collective under ZeRO-3."""
    if getattr(model, "zero_optimization_stage", lambda: 0)() == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params))
    return contextlib.nullcontext()


# ---- the loader patches: checkpoints onto another number of processes -------------------
def any_world(model) -> None:
    """Let a DeepSpeed ZeRO engine load its checkpoints on another number of processes (a
    no-op for other models); call it once the model is prepared."""
    if hasattr(model, "_load_zero_checkpoint"):
        model._load_zero_checkpoint = functools.partial(_load_zero_shards, model)
        model._get_all_ckpt_names = functools.partial(_model_state_files, model)


def _load_zero_shards(engine, load_dir: str, tag: str, load_optimizer_states: bool = True) -> bool:
    """DeepSpeed's ZeRO shard loading, also onto another number of processes.

    DeepSpeed 0.19.8 refuses a checkpoint of another data-parallel world, and its universal
    conversion keeps only ``exp_avg``/``exp_avg_sq``. Here every saved shard is read and the
    flat fp32 weights and *every* optimizer state (AMSGrad's ``max_exp_avg_sq`` included) are
    re-cut for this world. Stages 1/2: DeepSpeed's own "elastic" merge (the checkpoint is saved
    unpadded, see :func:`deepspeed_config`); its loader indexes the shards by this rank (out
    of range when the world grows) and wants a per-group ``step``, which torch's Adam keeps
    per parameter instead. Stage 3: :func:`_recut_zero3`.
    """
    from deepspeed.checkpoint.constants import BASE_OPTIMIZER_STATE, OPTIMIZER_STATE_DICT

    opt, world = engine.optimizer, engine.seq_dp_world_size
    if engine.zero_optimization_stage() == 3 and engine.loaded_checkpoint_dp_world_size != world:
        # DeepSpeed reads only this rank's shard at stage 3: read them all.
        names = engine._get_all_zero_checkpoint_names(load_dir, tag, engine.bfloat16_enabled())
        if names is None:
            return False
        saved = [engine.checkpoint_engine.load(name, map_location="cpu")[OPTIMIZER_STATE_DICT]
                 for name in names]
        shards = [_recut_zero3(opt, saved)] * world  # the loader takes this rank's entry
    else:
        shards = engine._get_all_zero_checkpoints(load_dir, tag)
    if shards is None:
        return False
    if engine.zero_optimization_stage() == 3:
        opt.load_state_dict(state_dict_list=shards, load_optimizer_states=load_optimizer_states,
                            load_from_fp32_weights=engine.zero_load_from_fp32_weights(),
                            checkpoint_folder=None, load_serial=None,
                            param_shapes=engine._get_zero_param_shapes())
        return True
    if not isinstance(shards[0][BASE_OPTIMIZER_STATE], list):  # saved without elastic_checkpoint
        if len(shards) != world:
            raise UserError(f"ZeRO checkpoint {load_dir} was saved without elastic_checkpoint; "
                            f"resume it on {len(shards)} processes")
        return type(engine)._load_zero_checkpoint(engine, load_dir, tag, load_optimizer_states)
    opt._wait_for_offload_copies()
    opt._load_global_state(shards[0])
    if load_optimizer_states:
        # One flat fp32 partition per group: merge the saved ones, cut this rank's. Through
        # torch's load_state_dict, which also drops any state the saved one lacks.
        inner, state = opt.optimizer, {}
        for i in range(len(inner.param_groups)):
            saved = [shard[BASE_OPTIMIZER_STATE][i] for shard in shards]
            state[i] = {}
            for key, value in saved[0].items():
                if torch.is_tensor(value) and value.dim() > 0:
                    value = opt._partition_base_optimizer_state(key, [s[key] for s in saved], i)
                state[i][key] = value.clone() if torch.is_tensor(value) else value
        inner.load_state_dict({"state": {i: s for i, s in state.items() if s},
                               "param_groups": inner.state_dict()["param_groups"]})
    if engine.zero_load_from_fp32_weights():
        opt._restore_from_elastic_fp32_weights(shards)
    else:
        opt._restore_from_bit16_weights()
    if load_optimizer_states:
        opt._link_all_hp_params()
    return True


def _model_state_files(engine, load_dir: str, tag: str) -> list[str]:
    """The engine's model-state files. ZeRO-3 names them by rank and a rank beyond the saved
    world finds none: it reads rank 0's (they differ only in partitioned placeholders)."""
    files = type(engine)._get_all_ckpt_names(engine, load_dir, tag)
    if not files and engine.zero_optimization_partition_weights():
        files = sorted(glob.glob(engine._get_ckpt_name(load_dir, tag, mp_placeholder="*",
                                                       pp_placeholder="0")))
    return files


def _recut_zero3(opt, shards: list[dict]) -> dict:
    """This rank's ZeRO-3 optimizer shard, cut from ``shards`` saved by another world size.

    ZeRO-3 gives rank r elements ``[r*s, (r+1)*s)`` of every parameter, ``s = ceil(numel /
    world)``, zero-padded, and a flat fp32 group (and each optimizer state) is those pieces
    concatenated in parameter order. Rebuild each parameter whole from the saved world's
    pieces, then cut this world's.
    """
    from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT

    saved, rank = len(shards), torch.distributed.get_rank(group=opt.dp_process_group)
    params = [p for group in opt.fp16_groups for p in group]

    def recut(flats: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        per_rank = [torch.cat([t.reshape(-1) for t in f]) for f in flats]
        sizes = [-(-p.ds_numel // saved) for p in params]
        if any(len(r) != sum(sizes) for r in per_rank):
            raise UserError("the ZeRO-3 checkpoint does not match this model's parameters")
        whole = [torch.cat([r[o:o + s] for r in per_rank])[:p.ds_numel] for p, s, o in
                 zip(params, sizes, itertools.accumulate([0] + sizes))]
        out, k = [], 0
        for group in opt.fp16_groups:
            pieces = []
            for p in group:
                s = p.partition_numel()
                piece = whole[k][rank * s:(rank + 1) * s]
                pieces.append(torch.nn.functional.pad(piece, (0, s - len(piece))))
                k += 1
            out.append(torch.cat(pieces))
        return out

    recut_keys = (FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT)
    state = {k: v for k, v in shards[0].items() if k not in recut_keys}
    state[FP32_FLAT_GROUPS] = recut([sd[FP32_FLAT_GROUPS] for sd in shards])
    optim = shards[0][OPTIMIZER_STATE_DICT]
    if len(optim["state"]) not in (0, len(opt.fp16_groups)):
        raise UserError(f"the ZeRO-3 checkpoint has {len(optim['state'])} optimizer sub-groups, "
                        f"this run {len(opt.fp16_groups)}: resume on the same number of processes")
    groups = range(len(opt.fp16_groups))
    per_group = {}
    for key, first in (optim["state"].get(0) or {}).items():
        if torch.is_tensor(first) and first.dim() > 0:
            per_group[key] = recut([[sd[OPTIMIZER_STATE_DICT]["state"][i][key] for i in groups]
                                    for sd in shards])
        else:  # the step: one per group, equal on every rank (its own tensor: stepped in place)
            per_group[key] = [optim["state"][i][key] for i in groups]
    state[OPTIMIZER_STATE_DICT] = {
        "state": {i: {key: v[i] for key, v in per_group.items()} for i in groups
                  if per_group},
        "param_groups": optim["param_groups"]}
    return state


# ---- the strategy ------------------------------------------------------------------------
class ZeRO(Strategy):
    """DeepSpeed ZeRO stage 1, 2 or 3 (``zero1``, ``zero2``, ``zero3``), with the optimizer
    states (and at stage 3 the parameters) offloaded to CPU RAM (``zero2-offload``,
    ``zero3-offload``). bf16/fp16 keep 16-bit weights and step an fp32 master copy."""

    def __init__(self, name: str, user_config: dict | None = None):
        super().__init__(name, user_config)
        self.zero_stage, self.offload = int(name[4]), name.endswith("-offload")
        self.layout = f"zero{self.zero_stage}"

    def prepare_env(self, world: int) -> None:
        if "WORLD_SIZE" not in os.environ:
            # A plain `python recipe.py --strategy zero2`: without a launcher's variables
            # DeepSpeed goes looking for MPI. One process is a world of one on this host.
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                               ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
                os.environ.setdefault(key, value)
        # DeepSpeed 0.19.8 calls torch's deprecated all_gather_into_tensor at every step; torch
        # 2.14 warns each time, burying the progress bar.
        warnings.filterwarnings("ignore", r"`torch\.distributed\.all_gather_into_tensor` is "
                                "deprecated", FutureWarning)
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's ops and comm on CPU

    def accelerator_kwargs(self, *, micro_batch, grad_accum, world, clip, precision, freezes):
        config = deepspeed_config(self.zero_stage, self.offload, micro_batch=micro_batch,
                                  grad_accum=grad_accum, world=world, clip=clip,
                                  precision=precision, user=self.user_config)
        return {"deepspeed_plugin": DeepSpeedPlugin(hf_ds_config=config, zero3_init_flag=False),
                "kwargs_handlers": []}

    def check(self, *, precision, clip, freezes, device) -> None:
        if precision == "fp16" and device.type == "cpu":
            raise UserError("precision=fp16 under DeepSpeed needs a GPU (its CPU accelerator "
                            "has no loss scaler); use --precision bf16 or fp32 on CPU")
        if clip is not None and freezes:
            raise UserError("--clip with a stage that freezes layer groups under DeepSpeed: its "
                            "frozen groups keep their gradients (stepped at lr 0), which the "
                            "clipping norm would count; use --strategy ddp or no --clip")

    def prepare(self, accelerator, model, build_optimizer) -> None:
        self.accelerator = accelerator
        optimizer = build_optimizer(model)
        if schedule_free(optimizer):
            raise UserError(f"--strategy {self.name} with a schedule-free optimizer: DeepSpeed "
                            "steps flat copies of the parameters, so the averaged weights it "
                            "switches to for evaluation would not reach the model; use ddp")
        if orthogonalizes(optimizer):
            raise UserError(f"--strategy {self.name} with muon: DeepSpeed steps flat copies "
                            "of the parameters, and Newton-Schulz needs whole matrices; use ddp")
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        any_world(self.model)

    def forward_backward(self, loss_of, last):
        # The engine divides by its gradient_accumulation_steps (= grad_accum), reduces at
        # the boundary, clips (its gradient_clipping) and steps there.
        loss = loss_of()
        self.model.set_gradient_accumulation_boundary(last)
        self.model.backward(loss)
        if last:
            self.model.step()
        return loss

    def step(self, clip) -> None:
        """Done by the engine in :meth:`forward_backward`'s last micro-batch."""

    def freeze(self, grouped, trains) -> list[float]:
        return [1.0 if t else 0.0 for t in trains]

    def unwrapped(self) -> torch.nn.Module:
        from deepspeed import DeepSpeedEngine

        return self.model.module if isinstance(self.model, DeepSpeedEngine) else self.model

    def scoring_model(self):
        return self.model  # a ZeRO-3 engine's own forward gathers its partitioned parameters

    def full_state_dict(self):
        unwrapped = self.unwrapped()
        with gathered(self.model, unwrapped.parameters()):
            return {k: v.detach().cpu().clone() for k, v in unwrapped.state_dict().items()}

    def hard_exit(self) -> bool:
        return True  # a process group runs even in one process; its CPU comm op aborts too

    @staticmethod
    def checkpoint_weights(folder: Path) -> dict[str, torch.Tensor] | None:
        states = folder / "pytorch_model" / "mp_rank_00_model_states.pt"
        if not states.is_file():
            return None
        module = torch.load(states, map_location="cpu", weights_only=False)["module"]
        if module and all(v.numel() > 0 for v in module.values()):
            return module  # ZeRO-1/2 keep the whole weights there
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="pytorch_model")

    @classmethod
    def memory(cls, name, n_params, world, precision, states) -> Estimate:
        """DeepSpeed 0.19.8's choices (``runtime/zero/stage_1_and_2.py``, ``stage3.py``): the
        model in 16 bits under bf16/fp16 and an fp32 master partition (cloned even in fp32 at
        stages 1-2 and under offload); stage 1 shards the states and master, 2 the gradients
        too, 3 the parameters too; offload moves master, states and an fp32 gradient
        partition to CPU RAM, zero3-offload the parameter partitions too."""
        out = empty_estimate()
        stage, offload = int(name[4]), name.endswith("-offload")
        part = -(-n_params // world)  # ceil: the last rank's partition is padded
        model_bytes = 4 if precision == "fp32" else 2
        optim_place = "cpu" if offload else "device"
        if stage < 3:
            out["device.params"] = model_bytes * n_params
        else:
            out[f"{optim_place}.params"] = model_bytes * part
        if offload:
            # The reduced partition goes straight into the CPU optimizer's fp32 buffer.
            out["cpu.grads"] = 4 * part
        else:
            out["device.grads"] = model_bytes * (n_params if stage == 1 else part)
        if stage < 3 or offload or precision != "fp32":
            out[f"{optim_place}.master_params"] = 4 * part
        for s in states:
            out[f"{optim_place}.{s}"] = 4 * part
        return out
