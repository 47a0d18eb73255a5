"""Files that are written whole or not at all, and survive a power cut once written.

One writer for every small file the toolkit must never leave half-written: ``config.json``,
``results.json``, ``lr_find.json`` (:func:`toolkit.config.write_json`), the token cache
(:mod:`toolkit.lm.data`) and a checkpoint's ``COMMITTED`` marker
(:mod:`toolkit.checkpoint`). The recipe is torch DCP's for its ``.metadata``: a temp file in
the same folder (a rename is atomic only within one file system), written, flushed and
fsynced (else the rename can reach the disk before the data, and a crash leaves an empty
file under the final name), renamed over the target, then the folder fsynced (else the
rename itself can be lost). A reader sees the old file or the new one, never a mix.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path | str) -> None:
    """Make the entries of folder ``path`` (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_temp(path: Path) -> tuple[int, Path]:
    # Not tempfile.mkstemp: it creates files 0600, and a run's config.json and results.json
    # must keep the permissions a plain open() gives them (0666 less the umask).
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def write_atomic(path: Path | str, data: bytes | str | Callable[[BinaryIO], object]) -> None:
    """Replace ``path`` by ``data`` atomically and durably (the folder must exist).

    ``data`` is bytes, a str (written as UTF-8) or a function that writes into the binary
    file it is given (``lambda f: torch.save(obj, f)``). If anything fails on the way (an
    exception in ``data``, a full disk), the temp file is removed and ``path`` is as it was.
    Several processes may write one path at once: each rename is whole, the last one wins.
    """
    path = Path(path)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
