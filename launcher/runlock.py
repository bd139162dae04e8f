"""Advisory locks on the run directory: two runs never interleave their checkpoints."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import IO

from launcher.errors import RunError


def acquire(path: Path, holder_kind: str) -> IO[str]:
    """Take an exclusive flock on `path` (kept while the handle stays open) and record who
    holds it; RunError naming the holder if another process has it."""
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        run_dir = path.parent
        raise RunError(
            f"{run_dir} is in use by {holder_kind} ({holder}): wait for it, stop it with "
            f"`tune-launch cancel {run_dir}`, or choose another --run-dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle
