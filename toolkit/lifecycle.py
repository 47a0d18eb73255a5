"""A run's life: one owner per output folder, and no worker outliving its launcher.

Two runs writing one folder corrupt each other's checkpoints (one rank's temp folder
vanishes under the other's rename), and it happens when a command is started twice or when
a launcher dies and its workers train on: ``torchrun`` starts its workers in sessions of
their own, so killing the launcher's process group leaves them running.

- :func:`claim` takes an exclusive ``flock`` on the run folder's lock file
  (:attr:`toolkit.run_folder.RunFolder.lock`, ``OUTPUT_DIR/.lock``) for the life of the
  process. The kernel drops it when the process dies, however it dies, so no stale lock is
  ever left; a second run is refused with the holder's host, pid and start time.
- :func:`exit_with_launcher` makes a launched worker exit within a second once its parent
  (the launcher) is gone. Nothing is saved then: the newest committed checkpoint is the
  resume point, and a checkpoint half-written is invisible (:mod:`toolkit.checkpoint`).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from toolkit.errors import UserError


def claim(lock: Path):
    """Hold the file ``lock`` (in the output folder it guards) exclusively until the process
    ends; return the open file (keep it).

    Raises :class:`UserError` naming the holder if another live process has it.
    """
    out = lock.parent
    out.mkdir(parents=True, exist_ok=True)
    f = open(lock, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        try:
            holder = json.loads(f.read())
            who = f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
        except (ValueError, KeyError):
            who = "a process that has not written its name yet"
        f.close()
        raise UserError(f"--output-dir {out} is in use by another run ({who}); wait for it to "
                        "end or stop it, or choose another --output-dir") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
    f.flush()
    return f


def launched() -> bool:
    """Started by a launcher (torchrun, accelerate launch, deepspeed), which sets LOCAL_RANK."""
    return "LOCAL_RANK" in os.environ


def exit_with_launcher(poll_s: float = 0.5) -> None:
    """Exit this process soon after its parent process is gone (a daemon thread polls).

    Only for launched workers: a plain ``python recipe.py`` under ``nohup`` loses its shell
    and must train on.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        rank = os.environ.get("RANK", "?")
        print(f"error (rank {rank}): the launcher (pid {parent}) is gone; this worker stops "
              "(resume from the newest checkpoint with --resume auto)", file=sys.stderr,
              flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-launcher", daemon=True).start()


def exit_process(code: int) -> None:
    """Exit a finished multi-process or DeepSpeed run without the interpreter's teardown.

    Its C++ threads abort it now and then at interpreter exit with "terminate called without
    an active exception" (SIGABRT), after the run finished, saved and closed: gloo when the
    last thing a rank did was a collective (a final evaluation; pytorch#179291: 4 of 10
    two-process launches here) and DeepSpeed 0.19.8's CPU comm op (about 1 in 20 ZeRO
    launches). Everything is written and closed by then; skip the C++ destructors.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
