"""Serving is argv plus a managed process: the vLLM OpenAI-compatible server for a run.

    with VLLMServer(spec) as server: ...      start, wait for /health, always stop
    serve_cli(target, ...)                    `tune-launch serve RUN_DIR|MODEL_DIR`
    check_contract(base_url, name, dir)       the train/serve contract (serve/contract.py)

What is served and the exact command come from serve/spec.py (ServeSpec, render_argv,
render_env). The server runs in its own process group with its log in the work directory;
the API key is read from the variable named by serve.api_key_env and handed to vLLM as
VLLM_API_KEY, never on the command line or in a log.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Literal

from launcher import process
from launcher.errors import Problem, RecipeError, RunError
from launcher.rundir import RunDir
from serve.contract import check_contract
from serve.spec import (
    BASE_NAME,
    Engine,
    ServeSpec,
    check_servable,
    is_model_dir,
    render_argv,
    render_env,
    spec_for_base,
    spec_for_model_dir,
    spec_for_run,
)

__all__ = [
    "BASE_NAME",
    "ServeSpec",
    "VLLMServer",
    "check_contract",
    "render_argv",
    "render_env",
    "serve_cli",
    "spec_for_base",
    "spec_for_model_dir",
    "spec_for_run",
]

log = logging.getLogger(__name__)

TAIL_LINES = 30


# --------------------------------------------------------------------------------------------
# The managed process


USER_WINS = ("VLLM_CPU_KVCACHE_SPACE", "TORCHINDUCTOR_CACHE_DIR", "VLLM_CACHE_ROOT")


def server_env(spec: ServeSpec, environ: Mapping[str, str], api_key: str | None) -> dict[str, str]:
    """The server's environment: `environ` with render_env's variables over it (their
    folders created), except those the user set (USER_WINS: a KV-cache size, compile caches
    shared between runs, which inductor and vLLM key by what they compile); VLLM_API_KEY only
    when serve.api_key_env gave one."""
    env = dict(environ)
    extra = {k: v for k, v in render_env(spec).items() if k not in USER_WINS or k not in env}
    env |= extra
    env.pop("VLLM_API_KEY", None)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    for name in ("VLLM_CACHE_ROOT", "VLLM_RPC_BASE_PATH", "TMPDIR", "TORCHINDUCTOR_CACHE_DIR"):
        if name in extra:
            Path(extra[name]).mkdir(parents=True, exist_ok=True)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def log_tail(path: Path, lines: int = TAIL_LINES, redact: str | None = None) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no server log)"
    all_lines = text.splitlines()
    tail = "\n".join(all_lines[-lines:])
    # vLLM's last lines often say only "See root cause above": name the first real error too
    cause = next((line.strip() for line in all_lines[:-lines] if _ERROR_LINE.search(line)), None)
    if cause:
        tail = f"first error in the log: {cause}\n...\n{tail}"
    return tail.replace(redact, "***") if redact else tail


_ERROR_LINE = re.compile(r"^\s*(?:\([\w ]+pid=\d+\)\s*)?[\w.]*(?:Error|Exception): ")


class VLLMServer:
    """`with VLLMServer(spec) as server:` a healthy server at `server.url`, stopped on exit.

    The server runs in its own process group with its log in WORK_DIR/logs/server.log (or
    `log_path`). Start-up waits for /health up to spec.health_timeout_s; if the process dies
    or the time runs out it raises RunError quoting the log's last lines. Exit, an exception,
    Ctrl-C, SIGTERM to this process or its normal exit all stop the whole group: SIGTERM,
    then SIGKILL after `grace_s` (launcher/process.py); if this process is killed outright, a
    small watchdog process (`python -m launcher.process`) does the same. The SIGTERM handler
    is only installed from the main thread (chained to the previous one).
    """

    def __init__(
        self,
        spec: ServeSpec,
        *,
        log_path: str | Path | None = None,
        python: str | None = None,
        grace_s: float = 20.0,
    ) -> None:
        self.spec = spec
        self.log_path = Path(log_path or RunDir(spec.work_dir).server_log)
        self.python = python or sys.executable
        self.grace_s = grace_s
        self.port = spec.port
        self.proc: Any = None  # subprocess.Popen
        self._log: IO[bytes] | None = None
        self._api_key: str | None = None
        self._prev_sigterm: Any = None
        self._watchdog: Any = None
        # the server and every descendant seen: pid -> create time (a reused pid is spared)
        self.spawned: dict[int, float] = {}
        self.startup_s: float | None = None

    # -- public --------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://{client_host(self.spec.host)}:{self.port}"

    @property
    def url(self) -> str:
        """The OpenAI base URL (…/v1)."""
        return f"{self.base_url}/v1"

    @property
    def api_key(self) -> str | None:
        return self._api_key

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def __enter__(self) -> VLLMServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        import subprocess

        spec = self.spec
        check_servable(spec)
        if spec.api_key_env:
            self._api_key = os.environ.get(spec.api_key_env)
            if not self._api_key:
                raise RunError(
                    f"serve.api_key_env names {spec.api_key_env}, which is not set: export it "
                    "in the environment that starts the server, or remove serve.api_key_env"
                )
        if not self.port:
            self.port = free_port(spec.host if spec.host not in ("", "::") else "0.0.0.0")
        argv = render_argv(spec, self.port, self.python)
        env = server_env(spec, os.environ, self._api_key)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._log.write(f"\n# {stamp} tune-launch starts: {shlex.join(argv)}\n".encode())
        self._log.flush()
        self._install_signal_handler()
        atexit.register(self.stop)
        started = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=spec.work_dir if Path(spec.work_dir).is_dir() else None,
                start_new_session=True,  # its own process group: stop() signals all of it
            )
            self.spawned |= process.started([self.proc.pid])
            watch = [str(os.getpid()), str(self.proc.pid), str(self.grace_s)]
            self._watchdog = subprocess.Popen(
                [sys.executable, "-m", "launcher.process", *watch],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # outside the group it guards
            )
            log.info(
                "vLLM server pid %s starting on %s (log %s)", self.proc.pid, self.url, self.log_path
            )
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started
        log.info("vLLM server healthy after %.1f s: %s", self.startup_s, self.url)

    def stop(self) -> None:
        """Stop the process group (SIGTERM, then SIGKILL) and any straggling descendant."""
        proc, self.proc = self.proc, None
        if proc is not None:
            # vLLM swallows a lone SIGTERM to its API server while the engine starts: the
            # whole group is signalled, and every descendant seen (some leave the group)
            self.spawned |= process.tree(proc.pid)
            if process.stop(proc.pid, self.grace_s, group=True, seen=self.spawned, reap=proc.poll):
                log.warning("vLLM server did not stop in %.0f s: SIGKILL", self.grace_s)
            with contextlib.suppress(Exception):  # subprocess.TimeoutExpired
                proc.wait(timeout=10)
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            try:
                watchdog.wait(timeout=5)  # it leaves by itself once the group is gone
            except Exception:
                watchdog.kill()
                watchdog.wait()
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None
        self._restore_signal_handler()
        atexit.unregister(self.stop)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = TAIL_LINES) -> str:
        return log_tail(self.log_path, lines, redact=self._api_key)

    # -- internals -----------------------------------------------------------------------
    def _wait_healthy(self) -> None:
        import httpx

        deadline = time.monotonic() + self.spec.health_timeout_s
        with httpx.Client(timeout=3.0) as client:
            while True:
                code = self.proc.poll()
                if code is not None:
                    raise RunError(
                        f"the vLLM server exited with code {code} before it was healthy "
                        f"(model {self.spec.model}). Last lines of {self.log_path}:\n{self.tail()}"
                    )
                self.spawned |= process.tree(self.proc.pid)
                try:
                    if client.get(f"{self.base_url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RunError(
                        f"the vLLM server was not healthy within {self.spec.health_timeout_s:.0f} s "
                        f"(serve.health_timeout_s; model {self.spec.model}). "
                        f"Last lines of {self.log_path}:\n{self.tail()}"
                    )
                time.sleep(0.5)

    def _install_signal_handler(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        prev = signal.getsignal(signal.SIGTERM)
        if prev is signal.SIG_IGN:
            return

        def _on_sigterm(signum: int, frame: FrameType | None) -> None:
            self.stop()
            if callable(prev):
                prev(signum, frame)
            else:
                raise SystemExit(128 + signum)

        self._prev_sigterm = (prev, _on_sigterm)
        signal.signal(signal.SIGTERM, _on_sigterm)

    def _restore_signal_handler(self) -> None:
        if self._prev_sigterm is None or threading.current_thread() is not threading.main_thread():
            return
        prev, ours = self._prev_sigterm
        self._prev_sigterm = None
        if signal.getsignal(signal.SIGTERM) is ours:
            signal.signal(signal.SIGTERM, prev if prev is not None else signal.SIG_DFL)


# --------------------------------------------------------------------------------------------
# tune-launch serve


def serve_cli(
    target: Path,
    port: int | None = None,
    host: str | None = None,
    engine: Engine | None = None,
    mode: Literal["merged", "lora"] | None = None,
) -> int:
    """`tune-launch serve RUN_DIR|MODEL_DIR`: serve in the foreground until Ctrl-C (on a
    SLURM cluster, run it inside an allocation: salloc/srun)."""
    target = Path(target)
    if RunDir(target).has_plan():
        spec = spec_for_run(target, mode=mode, engine=engine, host=host, port=port)
        contract_dir = _contract_dir(target, spec)
    elif is_model_dir(target):
        if mode == "lora":
            raise RecipeError(
                [Problem("--mode", "lora needs a run directory", "pass RUN_DIR", "lora")], "usage"
            )
        spec = spec_for_model_dir(target, engine=engine, host=host, port=port)
        contract_dir = target
    else:
        raise RecipeError(
            [
                Problem(
                    "target",
                    "neither a run directory (plan.json) nor a model directory (config.json)",
                    "pass RUN_DIR or a directory holding config.json + weights",
                    str(target),
                )
            ],
            "usage",
        )
    server = VLLMServer(spec)
    print(f"starting vLLM ({spec.engine}) for {spec.model}; log: {server.log_path}", flush=True)
    try:
        with server:
            print(f"serving {', '.join(spec.model_names)} at {server.url}", flush=True)
            print(f"  (ready after {server.startup_s:.0f} s; Ctrl-C stops it)", flush=True)
            name = spec.model_names[-1]
            try:
                check_contract(server.base_url, name, contract_dir, api_key=server.api_key)
                print(f"train/serve contract: ok ({name})", flush=True)
            except RunError as exc:
                print(f"warning: train/serve contract: {exc}", file=sys.stderr, flush=True)
            while server.alive():
                time.sleep(1.0)
            raise RunError(f"the vLLM server exited. Last lines of its log:\n{server.tail()}")
    except KeyboardInterrupt:
        print("stopped", flush=True)
        return 0


def _contract_dir(run_dir: Path, spec: ServeSpec) -> Path:
    """Where the training tokenizer / train_contract.json of what is served lives."""
    if spec.lora_modules:
        return Path(spec.lora_modules[0][1])
    return Path(spec.model)
