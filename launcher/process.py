"""Stopping a process and everything it started, written once: SIGTERM, wait, SIGKILL.

Three callers: the local backend (the launch command's process group, cluster/local.py), the
SLURM node task (the launcher it started inside the job step, cluster/node_entry.py) and the
vLLM server (its process group, serve/vllm.py, and the watchdog that stops it when the process
that started it dies: `python -m launcher.process PARENT_PID GROUP GRACE_S`).

A process is known by its pid and its start time (`Tree`): a pid the kernel has since given to
another process is never signalled. torchrun starts each worker in a session of its own and
vLLM's engine may leave its group, so the group alone does not hold every descendant: `stop`
signals the group and every descendant it has seen.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable

Tree = dict[int, float]  # pid -> start time


def pid_alive(pid: int) -> bool:
    """The process exists (a zombie counts: it is not reaped yet)."""
    return _exists(os.kill, pid)


def group_alive(pgid: int) -> bool:
    """Some process of the group exists."""
    return _exists(os.killpg, pgid)


def _exists(send: Callable[[int, int], None], target: int) -> bool:
    """Signal 0 to `target`: it exists unless the kernel says there is no such process."""
    try:
        send(target, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """`sig` to a process group (start_new_session: its id is the leader's pid), if any is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def started(pids: Iterable[int]) -> Tree:
    """The pids that exist, with their start times."""
    import psutil

    found = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            found[pid] = psutil.Process(pid).create_time()
    return found


def tree(pid: int) -> Tree:
    """`pid` and its descendants, now."""
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        children = []
    return started([pid, *(child.pid for child in children)])


def alive(procs: Tree) -> list[int]:
    """Those of `procs` still running: the same process (start time), not a zombie."""
    import psutil

    left = []
    for pid, created in procs.items():
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
    return left


def _signal_each(procs: Tree, sig: signal.Signals) -> None:
    import psutil

    for pid, created in procs.items():
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.create_time() == created:
                proc.send_signal(sig)


def stop(
    pid: int,
    grace_s: float,
    *,
    group: bool,
    seen: Tree | None = None,
    reap: Callable[[], object] | None = None,
) -> bool:
    """Stop `pid` and what it started: SIGTERM, up to `grace_s` for everything to exit, then
    SIGKILL to what is left. Returns True when something had to be killed.

    group: `pid` leads a process group of its own (started with start_new_session) and the
    group gets the SIGTERM; otherwise `pid` and each of its descendants get it. The SIGKILL
    goes to the group and to every descendant still alive, also those in sessions of their own.
    seen: descendants seen earlier that may have left the tree since (re-parented to init).
    reap: called while waiting, by the parent of `pid`, to collect its exit (a zombie leader
    keeps its group alive); pass the caller's own wait, e.g. `Popen.poll`.
    """
    procs = {**(seen or {}), **tree(pid)}
    if group:
        signal_group(pid, signal.SIGTERM)
    else:
        _signal_each(procs, signal.SIGTERM)

    def running() -> bool:
        if reap is not None:
            reap()
        return bool(alive(procs)) or (group and group_alive(pid))

    deadline = time.monotonic() + grace_s
    while running() and time.monotonic() < deadline:
        time.sleep(0.2)
    killed = running()
    if group:
        signal_group(pid, signal.SIGKILL)
    _signal_each({p: procs[p] for p in alive(procs)}, signal.SIGKILL)
    return killed


def watch(parent: int, pgid: int, grace_s: float) -> None:
    """Run as a separate process: stop the group `pgid` once `parent` has died (this process
    is then re-parented), and leave as soon as the group is gone."""
    while group_alive(pgid):
        if os.getppid() != parent:
            stop(pgid, grace_s, group=True)
            return
        time.sleep(1)


if __name__ == "__main__":  # the watchdog: python -m launcher.process PARENT_PID GROUP GRACE_S
    watch(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
