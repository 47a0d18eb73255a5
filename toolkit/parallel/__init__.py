"""Parallel strategies by name: the one seam between the training loop and how its step is
spread over processes.

:data:`Strategy` is the ``--strategy`` flag: ``auto`` (what the launcher set up) or one of
:data:`Concrete`, the strategies a run really has; a run of one process is ``ddp`` at world
1 (DDP's arithmetic: each process holds everything). :func:`resolve` picks the one to run
and :func:`build` makes its object (:class:`~toolkit.parallel.base.Strategy`). Adding a
strategy is one module and its names in :data:`STRATEGIES`.

- :mod:`toolkit.parallel.ddp`: one process or DDP;
- :mod:`toolkit.parallel.zero`: DeepSpeed ZeRO 1/2/3, offload at stages 2 and 3;
- :mod:`toolkit.parallel.fsdp2`: torch's ``fully_shard``, offload on GPUs.
"""

from __future__ import annotations

import os
from typing import Literal, get_args

from toolkit.errors import UserError
from toolkit.parallel import ddp, fsdp2, zero
from toolkit.parallel.base import Strategy as Base
from toolkit.parallel.base import optimizer_state_bytes, torch_optimizer  # noqa: F401

Concrete = Literal["ddp", "zero1", "zero2", "zero3", "zero2-offload", "zero3-offload", "fsdp2",
                   "fsdp2-offload"]
Strategy = Literal["auto", Concrete]
CONCRETE: tuple[str, ...] = get_args(Concrete)
STRATEGIES: dict[str, type[Base]] = {
    "ddp": ddp.DDP, "zero1": zero.ZeRO, "zero2": zero.ZeRO, "zero3": zero.ZeRO,
    "zero2-offload": zero.ZeRO, "zero3-offload": zero.ZeRO, "fsdp2": fsdp2.FSDP2,
    "fsdp2-offload": fsdp2.FSDP2}


def check_name(name: str) -> None:
    if name not in ("auto", *CONCRETE):
        raise UserError(f"--strategy {name!r} is unknown; choose one of auto, "
                        f"{', '.join(CONCRETE)}")


def from_launcher() -> tuple[str, dict | None] | None:
    """The strategy an ``accelerate launch`` config asked for (DeepSpeed or FSDP) and a
    user DeepSpeed JSON, or None. Accelerate's own FSDP set-up is switched off: the
    toolkit shards the model itself."""
    launched = zero.from_launcher()
    if launched is not None:
        stage, offload, user = launched
        return f"zero{stage}" + ("-offload" if offload else ""), user
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise UserError(f"the launcher asks for FSDP version {version}; the toolkit runs FSDP2: "
                        "set fsdp_version: 2 in the config")
    os.environ["ACCELERATE_USE_FSDP"] = "false"
    offload = os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true"
    return ("fsdp2-offload" if offload else "fsdp2"), None


def resolve(flag: str, user_json: str | None) -> tuple[str, dict | None]:
    """The strategy to run and the user's DeepSpeed JSON: the flag, or the launcher's; both
    given must agree."""
    check_name(flag)
    launched = from_launcher()
    user = None if launched is None else launched[1]
    if user_json is not None:
        user = zero.load_json(user_json)
    if launched is None:
        return ("ddp" if flag == "auto" else flag), user
    name = launched[0]
    if flag not in ("auto", name):
        kind = "DeepSpeed" if name.startswith("zero") else "FSDP"
        raise UserError(f"--strategy {flag} contradicts the launcher's {kind} config ({name}); "
                        "drop one of them")
    return name, user


def build(flag: str, user_json: str | None = None) -> Base:
    """The strategy object for ``--strategy`` and ``--deepspeed-config``."""
    name, user = resolve(flag, user_json)
    if user is not None and not name.startswith("zero"):
        raise UserError(f"a DeepSpeed config was given but the strategy is {name}; use a "
                        "zero strategy or drop the DeepSpeed config")
    return STRATEGIES[name](name, user)


def memory(name: str, n_params: int, world: int, precision: str,
           states: tuple[str, ...]) -> dict[str, int]:
    """Bytes of the model states one process of strategy ``name`` holds."""
    return STRATEGIES[name].memory(name, n_params, world, precision, states)
