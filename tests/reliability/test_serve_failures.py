"""The serving engine fails to start (the real vLLM CPU server, through serve.vllm's public
API `VLLMServer(ServeSpec(...))`): the port is taken, or the KV cache asked for is far larger
than the machine's memory. Each must raise launcher.errors.RunError quoting the server's log
within the health timeout, and leave no server process behind.

Referenced, not repeated here (tests/serve, the vllm tier): a bad model path
(test_serve_lifecycle.py::test_bad_model_path_is_a_run_error_with_the_log_tail), the health
timeout, a killed parent (no orphan), the API key refused without it and never logged, and
the 127.0.0.1 bind (test_serve_server.py).
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from launcher.errors import RunError

from .conftest import TRAIN_DATA

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

HEALTH_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from launcher.tiny import write_tiny

    return Path(
        write_tiny(
            "llama", tmp_path_factory.mktemp("tiny") / "model", corpus_files=[str(TRAIN_DATA)]
        )
    )


def _spec(model: Path, work_dir: Path, **extra: Any) -> Any:
    """A vllm-cpu ServeSpec for the tiny model, failing within HEALTH_TIMEOUT_S."""
    from serve.vllm import ServeSpec

    return ServeSpec(
        model=str(model),
        served_name="m",
        engine="vllm-cpu",
        work_dir=str(work_dir),
        health_timeout_s=HEALTH_TIMEOUT_S,
        **extra,
    )


def _left(server: object) -> list[int]:
    """Processes the server spawned (same pid and start time) still running, or its group."""
    spawned: dict[int, float] = getattr(server, "spawned", {})
    left = []
    for pid, created in spawned.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except psutil.Error:
            continue
    leader = next(iter(spawned), None)
    if leader is not None:
        for proc in psutil.process_iter(["pid", "status"]):
            try:
                if os.getpgid(proc.pid) == leader and proc.info["status"] != psutil.STATUS_ZOMBIE:
                    left.append(proc.pid)
            except (ProcessLookupError, psutil.Error):
                continue
    return sorted(set(left))


def _start_and_fail(spec: object) -> tuple[object, str, float]:
    from serve.vllm import VLLMServer

    server = VLLMServer(spec)  # type: ignore[arg-type]
    started = time.monotonic()
    with pytest.raises(RunError) as info:
        server.start()
    took = time.monotonic() - started
    deadline = time.monotonic() + 30
    while _left(server) and time.monotonic() < deadline:
        time.sleep(0.5)
    return server, str(info.value), took


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield int(sock.getsockname()[1])


def test_port_in_use_is_a_run_error_with_the_log_and_no_orphan(
    tiny_model: Path, tmp_path: Path, busy_port: int, record_property
) -> None:
    record_property("fault_class", "serving: port in use")
    spec = _spec(tiny_model, tmp_path, port=busy_port)
    server, message, took = _start_and_fail(spec)
    assert took < HEALTH_TIMEOUT_S, f"{took:.0f} s: the failure waited for the health timeout"
    assert "Last lines of" in message and "Address already in use" in message, message
    assert not _left(server), f"orphans: {_left(server)}"
    assert (tmp_path / "logs" / "server.log").is_file()


def test_kv_cache_larger_than_memory_is_a_run_error_with_the_log_and_no_orphan(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record_property
) -> None:
    record_property("fault_class", "serving: out of memory (KV cache 100000 GiB)")

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "100000")  # GiB; the user's value wins
    spec = _spec(tiny_model, tmp_path)
    server, message, took = _start_and_fail(spec)
    assert took < HEALTH_TIMEOUT_S, f"{took:.0f} s: the failure waited for the health timeout"
    assert "Last lines of" in message and "exited with code" in message, message
    assert not _left(server), f"orphans: {_left(server)}"
    log = (tmp_path / "logs" / "server.log").read_text(errors="replace")
    cause = re.search(r"ValueError: (Available memory[^\n]*)", log)
    assert cause, "vLLM's own reason is in its log"
    assert "Available memory" in message, message  # the cause, not only the last lines
