"""Why a launch failed, worked out once for both backends: the first rank that failed, how it
ended, and the lines of its log worth quoting.

A rank that raises writes logs/rank{N}.error (launcher/train/entry.py) before it exits; a rank
killed from outside (SIGKILL, the OOM killer) writes nothing, and only torchrun's root-cause
report names it (`Root Cause ... rank : N ... exitcode : -9 (pid: P) (SIGKILL)`). A rank
that loses its peer fails too, later, with an error that says so ("Connection closed by peer",
a DistBackendError): a consequence, never the cause. So the first failure is, in order:
1. the rank torchrun reports killed by a signal;
2. the rank whose error file, written since the launch started, is the oldest that is not a
   lost peer (on several nodes each node's torchrun sees only its own ranks);
3. the rank torchrun reports (a rank that exited without an error file: os._exit, a crash);
4. the oldest error file of any kind.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from launcher.rundir import RunDir

TAIL_LINES = 25

_EXC_LINE = re.compile(
    r"^(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception|Interrupt)):\s*(.*)$"
)
# exceptions a launcher raises about a rank's failure: never the root cause itself
_NOT_ROOT = ("ChildFailedError", "SignalException", "DistBackendError", "DistNetworkError")
# what a rank raises when a peer it waits on in a collective has died (gloo, NCCL, c10d)
_LOST_PEER = re.compile(
    r"Connection (?:closed|reset) by peer|remote worker crash|DistBackendError|DistNetworkError"
    r"|NCCL communicator was aborted|Broken pipe",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Failure:
    """The first rank that failed (None: unknown) and the signal that killed it, if one did."""

    rank: int | None
    signal: str | None = None

    @property
    def where(self) -> str:
        return f"rank {self.rank}" if self.rank is not None else "the launcher"


def first_failure(run: RunDir, launcher_output: str, since: float) -> Failure:
    """The first failing rank of a launch that started at `since` (time.time()), from
    torchrun's output and the error files the ranks wrote."""
    start = launcher_output.rfind("Root Cause")
    report = launcher_output[start:] if start >= 0 else ""
    named = re.search(r"rank\s*:\s*(\d+)", report)
    killed = re.search(r"exitcode\s*:\s*-\d+[^\n]*\((SIG[A-Z0-9]+)\)", report)
    rank = int(named[1]) if named else None
    signal = killed[1] if killed else None
    if signal and rank is not None:
        return Failure(rank, signal)
    errors = sorted(
        (path.stat().st_mtime, number, path)
        for number, path in run.rank_errors().items()
        if path.stat().st_mtime >= since
    )
    causes = [number for _, number, path in errors if not lost_peer(read_end(path))]
    if causes:
        return Failure(causes[0])
    if rank is not None:
        return Failure(rank)
    return Failure(errors[0][1] if errors else None)


def lost_peer(error_text: str) -> bool:
    """Whether a rank's error says it failed because another rank went away."""
    return bool(_LOST_PEER.search(error_summary(error_text)))


def error_summary(log_text: str) -> str:
    """The first exception line of a training log that is not a launcher's echo of it."""
    candidates = []
    for line in log_text.splitlines():
        line = re.sub(r"^\[(?:rank|default)\d+\]:\s*", "", line.strip())
        match = _EXC_LINE.match(line)
        if match and match.group(1) not in _NOT_ROOT:
            candidates.append(line)
    if candidates:
        return candidates[0]
    tail_lines = [line for line in log_text.splitlines() if line.strip()]
    return tail_lines[-1].strip() if tail_lines else "no error output"


def read_end(path: Path, size: int = 64 * 1024) -> str:
    """The last `size` bytes of a file as text; "" when there is no file."""
    if not path.is_file():
        return ""
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - size))
        return fh.read().decode("utf-8", errors="replace")


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last non-empty lines of a log (progress bars' carriage returns as line breaks)."""
    text = read_end(path).replace("\r", "\n")
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])
