"""Process lifecycle of the real vLLM server: failures are RunErrors with the log tail, within
the timeout, and nothing is left running: not after a failed start, not after the parent is
terminated or killed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launcher.errors import RunError
from launcher.rundir import RunDir
from serve.spec import ENTRYPOINT
from serve.vllm import ServeSpec, VLLMServer

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]


def _group_members(pgid: int) -> list[int]:
    found = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def _alive(pids: dict[int, float]) -> list[int]:
    left = []
    for pid, created in pids.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except psutil.Error:
            continue
    return left


def _assert_gone(pids: dict[int, float], leader: int, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not _alive(pids) and not _group_members(leader):
            return
        time.sleep(0.5)
    raise AssertionError(f"orphans: {_alive(pids)} group {_group_members(leader)}")


def test_bad_model_path_is_a_run_error_with_the_log_tail(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-arch", "architectures": ["X"]}')
    spec = ServeSpec(
        model=str(broken),
        served_name="broken",
        engine="vllm-cpu",
        work_dir=str(tmp_path),
        health_timeout_s=300,
    )
    server = VLLMServer(spec)
    started = time.monotonic()
    with pytest.raises(RunError) as info:
        server.start()
    took = time.monotonic() - started
    message = str(info.value)
    assert "exited with code" in message and "Last lines of" in message
    assert "no-such-arch" in message or "Error" in message  # vLLM's own words, from the log
    assert took < 300
    assert server.proc is None
    _assert_gone(server.spawned, next(iter(server.spawned)))  # the first one is the leader
    assert RunDir(tmp_path).server_log.is_file()


def test_health_timeout_stops_the_starting_server(tmp_path: Path, tiny_base: Path) -> None:
    spec = ServeSpec(
        model=str(tiny_base),
        served_name="m",
        engine="vllm-cpu",
        work_dir=str(tmp_path),
        health_timeout_s=8,
    )
    server = VLLMServer(spec)
    started = time.monotonic()
    with pytest.raises(RunError, match=r"not healthy within 8 s.*Last lines of"):
        server.start()
    assert time.monotonic() - started < 8 + server.grace_s + 15
    _assert_gone(server.spawned, next(iter(server.spawned)))


PARENT = """
import sys, time
from serve.spec import ENTRYPOINT
from serve.vllm import ServeSpec, VLLMServer
spec = ServeSpec(model=sys.argv[1], served_name="m", engine="vllm-cpu", work_dir=sys.argv[2],
                 health_timeout_s=600)
with VLLMServer(spec):
    time.sleep(600)
"""


def _start_parent(tiny_base: Path, work: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PARENT, str(tiny_base), str(work)])


def _names(procs: list[psutil.Process]) -> set[str]:
    names = set()
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            names.add(proc.name())
    return names


def _wait_for_engine(parent: subprocess.Popen) -> tuple[int, dict[int, float]]:
    """The parent's server pid and every process it started (server tree and watchdog), once
    the engine is starting: API server -> VLLM::EngineCore (-> VLLM::Worker), ~45 s. (A lone
    SIGTERM to the API server is swallowed in this phase; the group must be signalled.)"""
    deadline = time.monotonic() + 240
    server_pid, seen = None, {}
    while time.monotonic() < deadline:
        with contextlib.suppress(psutil.Error):
            family = psutil.Process(parent.pid).children(recursive=True)
            for proc in family:
                with contextlib.suppress(psutil.Error):
                    seen[proc.pid] = proc.create_time()
                    if server_pid is None and ENTRYPOINT in " ".join(proc.cmdline()):
                        server_pid = proc.pid
            if server_pid and "VLLM::EngineCore" in _names(family):
                return server_pid, seen
        time.sleep(0.5)
    raise AssertionError(f"no vLLM engine under the parent's server {server_pid} in time")


def test_parent_death_leaves_no_orphan(tmp_path: Path, tiny_base: Path) -> None:
    """SIGTERM: the parent's handler stops the group. SIGKILL: no handler runs; the server's
    watchdog sees its parent gone and stops the group, then exits. Both parents run at once
    (each start costs ~45 s)."""
    parents = {
        sig: _start_parent(tiny_base, tmp_path / sig.name)
        for sig in (signal.SIGTERM, signal.SIGKILL)
    }
    servers = {sig: _wait_for_engine(parent) for sig, parent in parents.items()}
    for sig, parent in parents.items():
        server_pid, seen = servers[sig]
        seen |= {
            p.pid: p.create_time() for p in psutil.Process(server_pid).children(recursive=True)
        }
        os.kill(parent.pid, sig)
    for sig, parent in parents.items():
        parent.wait(timeout=60)
        server_pid, seen = servers[sig]
        if sig == signal.SIGTERM:
            assert parent.returncode == 128 + signal.SIGTERM  # exited through the handler
        _assert_gone(seen, server_pid, within_s=60)
