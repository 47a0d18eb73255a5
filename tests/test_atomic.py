"""The one atomic writer: whole or nothing, durable, and used by every small file the toolkit
must never leave half-written (config/results JSON, the token cache, the checkpoint marker)."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from toolkit import atomic
from toolkit.atomic import write_atomic
from toolkit.config import write_json


def test_bytes_str_and_a_writer_function(tmp_path):
    write_atomic(tmp_path / "a.bin", b"\x00\x01")
    write_atomic(tmp_path / "b.txt", "grüße\n")
    write_atomic(str(tmp_path / "c.pt"), lambda f: torch.save({"x": torch.arange(3)}, f))
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "grüße\n"
    assert torch.equal(torch.load(tmp_path / "c.pt")["x"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "c.pt"]


def test_permissions_are_a_plain_open_s(tmp_path):
    # Not mkstemp's 0600: results.json must stay readable as a plain open() would make it.
    umask = os.umask(0o022)
    try:
        write_atomic(tmp_path / "r.json", "{}")
        (tmp_path / "plain").write_text("{}")
    finally:
        os.umask(umask)
    mode = stat.S_IMODE((tmp_path / "r.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o644


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_a_crash_mid_write_leaves_the_old_file_and_no_temp(tmp_path, error):
    path = tmp_path / "results.json"
    path.write_text("old")

    def half_then_crash(f):
        f.write(b"new and half")
        f.flush()
        raise error

    with pytest.raises(type(error)):
        write_atomic(path, half_then_crash)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_failed_rename_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    write_json(path, {"a": 1})

    def full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", full)
    with pytest.raises(OSError, match="No space left"):
        write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_the_data_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace

    def logged_fsync(fd):
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        fsync(fd)

    def logged_replace(src, dst):
        events.append("rename")
        replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", logged_fsync)
    monkeypatch.setattr(atomic.os, "replace", logged_replace)
    write_json(tmp_path / "results.json", {"step": 3})
    assert events == ["fsync file", "rename", "fsync dir"]
    assert json.loads((tmp_path / "results.json").read_text()) == {"step": 3}
