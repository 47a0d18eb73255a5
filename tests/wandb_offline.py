"""Read a W&B offline run's ``run-ID.wandb`` file: W&B's transaction log (LevelDB's log
format: 32 KiB blocks of records with a 7-byte header, after a 7-byte ``:W&B`` file header),
each record a ``wandb.proto.wandb_internal_pb2.Record``, parsed with W&B's own protobuf.
wandb >= 0.20 dropped its Python reader (``wandb.sdk.internal.datastore``); this is that
reader's logic, for the tests."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1 and version == 0, (ident, magic, version)
    pos, parts = HEADER, []
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header: padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:
            break
        parts.append(data[pos + HEADER:pos + HEADER + length])
        pos += HEADER + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def history(path: Path) -> list[dict]:
    """The rows logged with ``run.log``, as {key: value} (``_step`` is the step)."""
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
             for item in r.history.item}
            for r in records(path) if r.WhichOneof("record_type") == "history"]


def run_record(path: Path):
    """The run's record: id, project, tags, notes, config."""
    return next(r.run for r in records(path) if r.WhichOneof("record_type") == "run")
