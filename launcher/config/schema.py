"""The recipe's schema: one closed, typed pydantic model per section.

`extra="forbid"` everywhere, each field documented where it is defined; defaults live here and
nowhere else. Loading a file (overrides, error messages, local paths) is `recipe.py`;
cross-section rules (batch divisibility, QLoRA under ZeRO-3, ...) are `rules.py`.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Literal

from pydantic import Field, field_validator

from launcher.config.schema_data import DataConfig as DataConfig
from launcher.config.schema_data import DataSource as DataSource
from launcher.config.schema_data import DataSources as DataSources
from launcher.config.schema_fsdp import FsdpConfig
from launcher.config.schema_train import TrainConfig as TrainConfig
from launcher.config.sections import Dtype, Section
from launcher.config.strategies import get_strategy

SECRET_DEFAULTS = ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY"]


class ModelConfig(Section):
    name_or_path: str = Field(
        description="Hub id, local directory, or `tiny:<arch>` (a tiny random model of that "
        "architecture, built into the run directory; for smoke runs and the CPU quickstart). "
        "A hub id is read offline from the Hugging Face cache (HF_HOME / HF_HUB_CACHE): "
        "download it first; `tune-launch run` refuses one that is not there."
    )
    architecture: str | None = Field(
        None,
        description="Architecture key of the built-in shape table (e.g. llama3.1-70b) used by "
        "the memory planner when config.json is not available offline (not a local directory, "
        "not in the Hugging Face cache), and by --smoke. Must agree with config.json when both "
        "are known.",
    )
    dtype: Dtype = Field("bf16", description="Dtype the weights are loaded in.")
    trust_remote_code: bool = Field(
        False, description="Run the model repository's own Python code. Off unless you trust it."
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel passed to from_pretrained."
    )
    liger_kernel: bool = Field(
        False,
        description="GPU: Liger's Triton kernels (transformers' use_liger_kernel: RoPE, "
        "RMSNorm, SwiGLU and the fused linear cross-entropy; axolotl's liger_* set, oumi's "
        "enable_liger_kernel). Needs the liger-kernel package on the cluster.",
    )
    task: Literal["causal_lm", "sequence_classification"] = Field(
        "causal_lm",
        description="causal_lm for SFT/DPO/continued pretraining; "
        "sequence_classification for label prediction with an encoder.",
    )
    num_labels: int | None = Field(
        None,
        ge=1,
        description="Number of classes (sequence_classification only); 1 for a reward model "
        "(data.format=reward).",
    )
    head_dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="sequence_classification: dropout on the input of the score / classifier "
        "layer while training (never at eval or in the saved model, which keeps transformers' "
        "layout). 0.1 is TRL's ValueHead, LLaMA-Factory's stage rm reward head "
        "(summary_dropout_prob).",
    )


class QuantConfig(Section):
    bits: Literal[4, 8] = Field(
        4,
        description="Bits of the quantized base: 4 (QLoRA, NF4/FP4) or 8 (LLM.int8: axolotl's "
        "load_in_8bit, LLaMA-Factory's quantization_bit 8; the 4-bit settings below do not "
        "apply, and ZeRO-3/FSDP cannot shard it).",
    )
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (bitsandbytes).")
    double_quant: bool = Field(True, description="Quantize the quantization constants too.")
    compute_dtype: Dtype | None = Field(
        None, description="Dtype of the 4-bit matmuls; default: model.dtype."
    )
    quant_storage: Literal["uint8", "bf16", "fp16", "fp32"] | None = Field(
        None,
        description="Storage dtype of packed 4-bit weights. Default: the compute dtype under "
        "ZeRO-3/FSDP (required there so shards flatten together), uint8 otherwise.",
    )


class MethodConfig(Section):
    kind: Literal["full", "lora", "qlora", "ia3", "prompt", "prefix"] = Field(
        "lora",
        description="full: train every weight; lora: low-rank adapters; qlora: adapters "
        "on a quantized base (4-bit, or 8-bit with method.quant.bits); ia3: learned scaling vectors on target_modules (IA3); prompt: "
        "trained virtual-token embeddings before the input (prompt tuning); prefix: trained "
        "keys/values prepended at every layer (prefix tuning). prompt and prefix cannot be "
        "merged or served by vLLM: eval generates in-process (launcher/config/methods.py).",
    )
    r: int = Field(16, gt=0, le=4096, description="LoRA rank.")
    alpha: float = Field(
        32, gt=0, description="LoRA alpha (scaling = alpha / r; alpha / sqrt(r) with use_rslora)."
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    use_dora: bool = Field(
        False,
        description="lora/qlora: DoRA, the weight split into magnitude and direction, the "
        "adapter on the direction (one trained magnitude per output feature).",
    )
    use_rslora: bool = Field(
        False, description="lora/qlora: rank-stabilised LoRA, scaling = alpha / sqrt(r)."
    )
    adapter_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="lora/qlora/ia3: dtype of the trained adapter weights (and so of their "
        "optimizer states). auto: what peft and TRL pick, named in the plan: fp32, the "
        "model's dtype under ZeRO-3, bf16 for qlora (DoRA's magnitude left fp32). bf16: "
        "torchtune's adapters, every trained weight (launcher/config/adapter_dtype.py).",
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names to adapt (lora, qlora, ia3), or all-linear. ia3 scales the "
        "input of the MLP's down projection and the output of every other target.",
    )
    num_virtual_tokens: int = Field(
        20, gt=0, le=1024, description="prompt/prefix: trained virtual tokens."
    )
    prompt_init_text: str | None = Field(
        None,
        min_length=1,
        description="prompt: initialise the virtual tokens from this text's embeddings "
        "(repeated to num_virtual_tokens); default: random.",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full and saved with the adapter (e.g. a classifier head).",
    )
    quant: QuantConfig = Field(default_factory=QuantConfig, description="QLoRA 4-bit settings.")


class TrackingConfig(Section):
    project: str | None = Field(
        None, description="W&B project and MLflow experiment name; default: the recipe's name."
    )
    wandb_mode: Literal["offline", "online"] = Field(
        "offline",
        description="offline: W&B writes the run to RUN_DIR/wandb (upload it later with `wandb "
        "sync`); online: it streams to W&B, with WANDB_API_KEY from the submitting shell (a "
        "secret: never written to plans, scripts or logs).",
    )
    wandb_entity: str | None = Field(
        None, description="W&B entity (user or team); default: the API key's own."
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        description="MLflow tracking store: a database (sqlite:///path.db, postgresql://...) or "
        "a tracking server (http://host:5000); default: sqlite:///RUN_DIR/mlflow.db.",
    )


class DistributedConfig(Section):
    strategy: Literal["ddp", "zero2", "zero3", "fsdp"] = Field(
        "ddp",
        description="Data parallelism: DDP, DeepSpeed ZeRO-2/3, or FSDP (GPU clusters; it wraps "
        "each transformer block, so the model's architecture must be known).",
    )
    offload_optimizer: bool = Field(False, description="ZeRO: optimizer states in host RAM.")
    fsdp: FsdpConfig = Field(
        default_factory=FsdpConfig,
        description="strategy=fsdp: FSDP version and sharding (launcher/config/schema_fsdp.py).",
    )
    overlap_comm: bool = Field(
        True,
        description="ZeRO: overlap the gradient reduction with the backward pass (DeepSpeed's "
        "overlap_comm; false as in LLaMA-Factory's ds_z3_config.json, less memory for buckets).",
    )
    offload_params: bool = Field(
        False, description="ZeRO-3 or FSDP: parameters (FSDP: and their optimizer) in host RAM."
    )
    launcher: Literal["torchrun", "accelerate"] = Field(
        "torchrun", description="Per-node process launcher."
    )
    nccl_timeout_s: int = Field(1800, gt=0, description="Collective timeout (seconds).")
    nccl_socket_ifname: str | None = Field(
        None, description="NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME."
    )
    nccl_ib_disable: bool | None = Field(None, description="Set NCCL_IB_DISABLE.")
    preflight_timeout_s: int = Field(
        60, gt=0, description="Pre-flight all-reduce must finish within this many seconds."
    )


_TIME = re.compile(r"^(\d+-)?\d{1,3}:\d{2}:\d{2}$|^\d+$")


def time_minutes(text: str) -> int:
    """A time limit ([D-]HH:MM:SS or minutes, SLURM's formats) as whole minutes, rounded up."""
    if re.fullmatch(r"\d+", text):
        return int(text)
    days, _, hms = text.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return (int(days or 0) * 24 + h) * 60 + m + math.ceil(s / 60)


class ResourcesConfig(Section):
    nodes: int = Field(1, gt=0, le=4096, description="Nodes.")
    gpus_per_node: int = Field(
        1,
        gt=0,
        le=64,
        description="GPUs per node (processes per node; on CPU clusters, processes on gloo).",
    )
    accelerator: Literal["gpu", "cpu"] = Field("gpu", description="gpu (NCCL) or cpu (gloo).")
    gpu_type: str | None = Field(None, description="GPU type for the gres request (e.g. h100).")
    gpu_memory_gib: float = Field(80.0, gt=0, description="Memory of one GPU, for the planner.")
    cpus_per_node: int | None = Field(None, gt=0, description="CPUs per node (per task).")
    mem_per_node_gib: int | None = Field(None, gt=0, description="Host memory per node.")
    time: str = Field("24:00:00", description="Time limit, [D-]HH:MM:SS or minutes.")
    partition: str | None = Field(None, description="SLURM partition.")
    account: str | None = Field(None, description="SLURM account.")
    qos: str | None = Field(None, description="SLURM QOS.")
    constraint: str | None = Field(None, description="SLURM constraint.")
    exclusive: bool = Field(False, description="Whole nodes.")
    sbatch_extra: dict[str, str | int | bool] = Field(
        default_factory=dict,
        description="Extra sbatch directives, e.g. {mail-type: END} -> #SBATCH --mail-type=END.",
    )
    signal_lead_s: int = Field(
        120, ge=10, description="Seconds before the time limit that the job is told to save."
    )
    max_requeues: int = Field(3, ge=0, le=100, description="Requeues after preemption/timeout.")
    backend: Literal["auto", "local", "slurm"] = Field(
        "auto", description="auto: slurm when sbatch is on PATH and nodes > 1, else local."
    )

    @field_validator("time")
    @classmethod
    def _time_format(cls, value: str) -> str:
        if not _TIME.match(value):
            raise ValueError("time must look like HH:MM:SS, D-HH:MM:SS or minutes")
        return value


class MergeConfig(Section):
    enabled: bool = Field(True, description="Merge adapters into the base after training.")
    shard_size_gb: float = Field(5.0, gt=0, description="Max size of a merged safetensors shard.")
    nf4_roundtrip: bool = Field(
        False, description="QLoRA: pass the base through NF4 quantize/dequantize before merging."
    )
    verify_tolerance: float = Field(
        1e-3, gt=0, description="Max |logits| difference merged vs base+adapter."
    )
    cpus: int | None = Field(
        None,
        ge=1,
        description="SLURM: CPUs of the merge job (one node, no GPU); default: "
        "resources.cpus_per_node up to 8, else 2.",
    )
    mem_gib: int | None = Field(
        None,
        ge=1,
        description="SLURM: host memory of the merge job; default: the planner's merge RAM "
        "(`tune-launch plan`) plus 4 GiB for the interpreter.",
    )


class ServeConfig(Section):
    enabled: bool = Field(
        False,
        description="Serve the result: the eval stage starts vLLM on it (required by "
        "eval.enabled); without eval, the run ends by printing the `tune-launch serve RUN_DIR` "
        "command.",
    )
    engine: Literal["vllm", "vllm-cpu"] = Field(
        "vllm", description="vllm on GPU hosts, vllm-cpu on CPU hosts."
    )
    mode: Literal["merged", "lora"] = Field(
        "merged",
        description="Serve the merged model, or the base with the adapter as a LoRA module.",
    )
    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8000, ge=0, lt=65536, description="Port (0: pick a free one).")
    api_key_env: str | None = Field(None, description="Environment variable holding the API key.")
    max_model_len: int | None = Field(None, gt=0, description="Default: data.max_seq_len.")
    tensor_parallel_size: int | None = Field(None, gt=0, description="Default: chosen from size.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM memory fraction.")
    health_timeout_s: int = Field(300, gt=0, description="Seconds to wait for /health.")
    extra_args: list[str] = Field(default_factory=list, description="More vLLM arguments.")


class EvalConfig(Section):
    enabled: bool = Field(False, description="Evaluate the served model after training.")
    data: str | None = Field(None, description="Eval file; default: the validation split.")
    max_examples: int = Field(200, gt=0, description="Examples evaluated.")
    concurrency: int = Field(8, gt=0, le=256, description="Requests in flight.")
    max_tokens: int = Field(32, gt=0, description="Generation budget per example.")
    few_shot: int = Field(3, ge=0, description="Examples in the base few-shot baseline.")
    compare_base: bool = Field(True, description="Also score the base model (and few-shot).")
    baseline_model: str | None = Field(
        None,
        description="The model scored as the base (default: the run's base model; a "
        "multi-stage workflow sets the first stage's, so the last stage is compared with it).",
    )
    lm_eval_tasks: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness tasks run against the served fine-tuned model and the "
        "base (names lm-eval knows offline, or tasks from eval.lm_eval_include).",
    )
    lm_eval_include: list[str] = Field(
        default_factory=list,
        description="Local lm-eval task YAML files or directories (relative to the recipe; "
        "data_files relative to the YAML), passed to lm-eval as --include_path.",
    )
    lm_eval_limit: int | None = Field(
        None, gt=0, description="lm-eval --limit: examples per task (default: all)."
    )
    general_tasks: list[str] = Field(
        default_factory=list,
        description="lm-eval tasks measuring what the base could already do, scored for base and "
        "fine-tuned: the forgetting check.",
    )
    forgetting_ratio: float = Field(
        0.9,
        gt=0,
        le=1,
        description="The report flags a general task whose fine-tuned score falls below this "
        "fraction of the base's.",
    )
    parity_examples: int = Field(
        8,
        ge=0,
        description="Held-out prompts in the train/serve parity gate (transformers on base + "
        "adapter vs the server): 0 turns the gate off.",
    )
    parity_tolerance: float = Field(
        0.05,
        gt=0,
        description="Largest |difference| of a reference token's log-probability (nats) "
        "between transformers and the server that the parity gate accepts.",
    )


class Recipe(Section):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="Run name: letters, digits, _ . - (used in paths and job names).",
    )
    run_dir: str | None = Field(None, description="Run directory; default runs/<name>.")
    model: ModelConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig, description="Tracker settings (train.trackers)."
    )
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    env: dict[str, Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=dict,
        description="Plain environment variables for every rank (values up to 4096 characters).",
    )
    secrets: list[str] = Field(
        default_factory=lambda: list(SECRET_DEFAULTS),
        description="Environment variables passed to the job from the submitting shell, never "
        "written to plans, scripts or logs.",
    )

    @field_validator("secrets")
    @classmethod
    def _env_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"{name!r} is not an environment variable name")
        return value


# --------------------------------------------------------------------------------------------
# Defaults that span sections (resolved once; the plan exposes them as properties)


def quant_compute_dtype(recipe: Recipe) -> str | None:
    """QLoRA's 4-bit matmul dtype: method.quant.compute_dtype, default model.dtype (None for
    other methods and for an 8-bit base)."""
    if recipe.method.kind != "qlora" or recipe.method.quant.bits != 4:
        return None
    return recipe.method.quant.compute_dtype or recipe.model.dtype


def quant_storage(recipe: Recipe) -> str | None:
    """QLoRA's storage dtype of packed 4-bit weights: the compute dtype under ZeRO-3/FSDP
    (shards of one dtype flatten together; rules.py refuses another), else the recipe's,
    default uint8 (None for other methods and for an 8-bit base)."""
    if recipe.method.kind != "qlora" or recipe.method.quant.bits != 4:
        return None
    if get_strategy(recipe.distributed.strategy).shards_parameters:
        return quant_compute_dtype(recipe)
    return recipe.method.quant.quant_storage or "uint8"
