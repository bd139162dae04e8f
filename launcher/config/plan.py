"""resolve(recipe, facts) -> Plan: frozen, pure, no I/O.

Everything a run needs is decided here, once, before anything is allocated: world size and
batch arithmetic, the compatibility rules (rules.py: each refusal says how to fix it), the
memory estimate and the concrete DeepSpeed / FSDP / accelerate / launch configs. Ranks read
only `plan.json`; every default a rank needs is a Plan field or a property computed from one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from launcher.config import arch, memory, render, rules
from launcher.config.adapter_dtype import resolve_adapter_dtype
from launcher.config.methods import Method, get_method, objective_args, objective_of
from launcher.config.schema import Recipe, quant_compute_dtype, quant_storage
from launcher.config.strategies import get_strategy
from launcher.errors import RecipeError
from launcher.rundir import RunDir

PLAN_VERSION = 2  # 2: FSDP settings in the plan, QLoRA dtypes and eval_steps derived


@dataclass(frozen=True)
class ClusterFacts:
    """What the outside world says, gathered by the caller (never by resolve itself)."""

    run_dir: str
    python: str = "python"
    model_config: dict[str, Any] | None = None  # config.json of a local model, when readable
    cpus: int = 8  # CPUs per node (for OMP threads per rank)
    smoke: bool = False
    warnings: list[str] = field(default_factory=list)


class Plan(BaseModel):
    """The resolved run. Serialised as RUN_DIR/plan.json."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = PLAN_VERSION
    name: str
    run_dir: str
    recipe: Recipe
    smoke: bool
    nodes: int
    gpus_per_node: int
    world_size: int
    on_gpu: bool
    micro_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int
    model_shape: dict[str, Any] | None
    deepspeed: dict[str, Any] | None
    fsdp: dict[str, Any] | None  # TrainingArguments' fsdp / fsdp_config for strategy fsdp
    accelerate: dict[str, Any]
    launch: list[str]
    env: dict[str, str]
    secrets: list[str]
    # train.trackers' folders, URIs and names (render.render_tracking); the rank hands them to
    # the libraries (launcher/train/tracking.py)
    tracking: dict[str, str] = Field(default_factory=dict)
    memory: dict[str, Any] | None
    serve: dict[str, Any]
    warnings: list[str]
    # what the rank's trainer optimises and its TRL config's own fields (methods.py)
    objective: str = "sft"
    objective_args: dict[str, Any] = Field(default_factory=dict)
    # the adapter's trainable weights' dtype (launcher/config/adapter_dtype.py); None: no adapter
    # on weights (full, prompt, prefix)
    adapter_dtype: str | None = None
    # train.dataloader_workers with `auto` resolved for this node (dataloader_workers_for)
    dataloader_workers: int = 0
    # data.streaming: how the rank streams data.train (launcher/data/stream.py), as
    # {shuffle_buffer, seed}; None: the data is read whole first (launcher/data/prepare.py)
    stream: dict[str, int] | None = None

    @model_validator(mode="before")
    @classmethod
    def _objective_of_older_plans(cls, data: Any) -> Any:
        """A plan.json written before the objective was planned: the recipe's own."""
        if isinstance(data, dict) and "objective" not in data and "recipe" in data:
            recipe = data["recipe"]
            recipe = Recipe.model_validate(recipe) if isinstance(recipe, dict) else recipe
            data = {**data, "objective": objective_of(recipe)}
            data["objective_args"] = objective_args(recipe)
        return data

    @property
    def run(self) -> RunDir:
        """The run directory this plan was resolved for (its owner: launcher/rundir.py)."""
        return RunDir(self.run_dir)

    @property
    def deepspeed_path(self) -> str | None:
        return str(self.run.deepspeed_file) if self.deepspeed else None

    @property
    def accelerate_path(self) -> str:
        return str(RunDir(self.run_dir).accelerate_file)

    @property
    def tiny_arch(self) -> str | None:
        """The architecture of a `tiny:<arch>` base model, built into RUN_DIR/base."""
        name = self.recipe.model.name_or_path
        return name.removeprefix("tiny:") if name.startswith("tiny:") else None

    @property
    def base_model(self) -> str:
        """Where the base model is read from: RUN_DIR/base for tiny:<arch>, else the recipe's."""
        return str(RunDir(self.run_dir).base) if self.tiny_arch else self.recipe.model.name_or_path

    @property
    def eval_baseline(self) -> str:
        """The model the evaluation scores as "base": eval.baseline_model, else base_model."""
        return self.recipe.eval.baseline_model or self.base_model

    @property
    def eval_steps(self) -> int:
        """Evaluate every N optimizer steps: train.eval_steps, default train.save_steps."""
        return self.recipe.train.eval_steps or self.recipe.train.save_steps

    @property
    def packing_strategy(self) -> str:
        """How TRL packs (data.packing): best-fit packing is padding-free, which needs
        FlashAttention to keep examples apart; otherwise examples are wrapped. Best fit cuts an
        example longer than max_seq_len (data.max_seq_len's truncation), except raw text
        (continued pretraining), whose overflow goes on in further blocks (bfd_split): no
        token of a long document is lost, as axolotl's and LLaMA-Factory's pretraining keep
        them."""
        if self.recipe.model.attn_implementation != "flash_attention_2":
            return "wrapped"
        return "bfd_split" if self.recipe.data.format == "text" else "bfd"

    @property
    def method(self) -> Method:
        """What method.kind does (launcher/config/methods.py): adapter, mergeable, vLLM."""
        return get_method(self.recipe.method.kind)

    @property
    def quant_compute_dtype(self) -> str | None:
        """QLoRA's 4-bit matmul dtype (None for other methods)."""
        return quant_compute_dtype(self.recipe)

    @property
    def quant_storage(self) -> str | None:
        """QLoRA's storage dtype of packed 4-bit weights (None for other methods)."""
        return quant_storage(self.recipe)


def _shape(recipe: Recipe, facts: ClusterFacts) -> arch.ModelShape | None:
    name = recipe.model.name_or_path
    if name.startswith("tiny:"):
        return arch.TINY.get(name.removeprefix("tiny:"))
    if facts.model_config:
        shape = arch.shape_from_config(facts.model_config)
        if shape:
            return shape
    if recipe.model.architecture:  # rules: a key of the built-in table (never a tiny shape)
        return arch.BUILTIN.get(recipe.model.architecture)
    return None


def _memory(
    recipe: Recipe, shape: arch.ModelShape, micro_batch_size: int
) -> tuple[dict[str, Any], list[str]]:
    """The memory estimate and the warnings when it does not fit the resources."""
    res, train, dist, method = recipe.resources, recipe.train, recipe.distributed, recipe.method
    on_gpu = res.accelerator == "gpu"
    inputs = memory.MemoryInputs(
        shape=shape,
        method=method.kind,
        dtype=recipe.model.dtype,
        precision=train.precision,
        lora_r=method.r,
        lora_targets=method.target_modules,
        optimizer=train.optimizer,
        strategy=dist.strategy,
        world_size=res.nodes * res.gpus_per_node,
        gpus_per_node=res.gpus_per_node,
        micro_batch_size=micro_batch_size,
        seq_len=recipe.data.max_seq_len or shape.max_position_embeddings,
        gradient_checkpointing=train.gradient_checkpointing,
        offload_optimizer=dist.offload_optimizer,
        offload_params=dist.offload_params,
        double_quant=method.quant.double_quant,
        quant_bits=method.quant.bits,
        on_gpu=on_gpu,
        merge_shard_gb=recipe.merge.shard_size_gb,
        modules_to_save=tuple(method.modules_to_save),
        num_labels=recipe.model.num_labels or 2,
        attention=recipe.model.attn_implementation,
        use_dora=method.use_dora,
        num_virtual_tokens=method.num_virtual_tokens,
        adapter_dtype=resolve_adapter_dtype(recipe) or recipe.model.dtype,
    )
    mem = memory.estimate(inputs)
    warnings = []
    if recipe.data.max_seq_len is None:
        warnings.append(
            "data.max_seq_len is null (no truncation): the memory estimate assumes the "
            f"model's context length, {shape.max_position_embeddings} tokens; the longest "
            "example of a batch decides the real peak"
        )
    per_gpu, host_load = mem["per_gpu_gib"], mem["host_ram_load_gib_per_node"]
    if on_gpu and per_gpu > res.gpu_memory_gib:  # type: ignore[operator]
        tips = "; ".join(memory.suggestions(inputs)) or "more GPUs"
        warnings.append(
            f"estimated {per_gpu} GiB per GPU exceeds {res.gpu_memory_gib} GiB: try {tips}"
        )
    if res.mem_per_node_gib and host_load > res.mem_per_node_gib:  # type: ignore[operator]
        warnings.append(
            f"loading needs ~{host_load} GiB of host RAM per node, "
            f"more than resources.mem_per_node_gib={res.mem_per_node_gib}"
        )
    return mem, warnings


def _serve_choice(recipe: Recipe, shape: arch.ModelShape | None) -> dict[str, Any]:
    """vLLM tensor-parallel size: the smallest divisor of the head count that fits the weights."""
    serve = recipe.serve
    gpus = recipe.resources.gpus_per_node
    if serve.tensor_parallel_size:
        return {"tensor_parallel_size": serve.tensor_parallel_size, "reason": "set in the recipe"}
    if shape is None or recipe.resources.accelerator == "cpu" or serve.engine == "vllm-cpu":
        return {"tensor_parallel_size": 1, "reason": "CPU engine or unknown shape"}
    weights_gib = shape.total_params() * memory.DTYPE_BYTES[recipe.model.dtype] / memory.GIB
    # weights take at most 70% of the usable memory, the rest is KV cache
    budget = recipe.resources.gpu_memory_gib * serve.gpu_memory_utilization * 0.7
    need = max(1, math.ceil(weights_gib / budget))
    for tp in (1, 2, 4, 8, 16):
        if tp >= need and shape.num_heads % tp == 0 and tp <= max(gpus, 1):
            return {
                "tensor_parallel_size": tp,
                "reason": f"{weights_gib:.1f} GiB of weights, {budget:.1f} GiB budget per GPU, "
                f"{shape.num_heads} heads",
            }
    return {"tensor_parallel_size": max(gpus, 1), "reason": "weights exceed one node's budget"}


def dataloader_workers_for(recipe: Recipe, cpus: int) -> int:
    """train.dataloader_workers; `auto` as oumi resolves it: 2 per GPU of the node, at most
    8 and a quarter of the node's CPUs, at least 1."""
    workers = recipe.train.dataloader_workers
    if workers != "auto":
        return workers
    return max(1, min(2 * recipe.resources.gpus_per_node, 8, int(cpus * 0.25)))


SHUFFLE_BUFFER = 10_000  # data.shuffle_buffer's default: rows a stream is shuffled through


def stream_for(recipe: Recipe) -> dict[str, int] | None:
    """data.streaming's settings for the rank, or None when the data is read whole."""
    data = recipe.data
    if not data.streaming:
        return None
    buffer = SHUFFLE_BUFFER if data.shuffle_buffer is None else data.shuffle_buffer
    return {"shuffle_buffer": buffer, "seed": data.seed}


def resolve(recipe: Recipe, facts: ClusterFacts) -> Plan:
    """Resolve a validated recipe into a frozen Plan; RecipeError lists every conflict."""
    shape = _shape(recipe, facts)
    candidate = rules.Candidate(recipe, shape, facts.model_config, facts.run_dir)
    problems, advice = rules.check(candidate)
    if problems:
        raise RecipeError(problems, f"recipe {recipe.name}")

    res, train, dist = recipe.resources, recipe.train, recipe.distributed
    nodes, gpn, run = res.nodes, res.gpus_per_node, RunDir(facts.run_dir)
    world, on_gpu, mbs = nodes * gpn, res.accelerator == "gpu", train.micro_batch_size
    gas = train.global_batch_size // (mbs * world)  # rules: it divides evenly
    mem, mem_warnings = _memory(recipe, shape, mbs) if shape else (None, [])
    deepspeed = render.render_deepspeed(
        strategy=dist.strategy,
        micro_batch_size=mbs,
        gradient_accumulation_steps=gas,
        world_size=world,
        max_grad_norm=train.max_grad_norm or 0.0,  # DeepSpeed: 0 is no clipping
        precision=train.precision,
        offload_optimizer=dist.offload_optimizer,
        offload_params=dist.offload_params,
        shape=shape,
        overlap_comm=dist.overlap_comm,
    )
    fsdp = None
    if get_strategy(dist.strategy).fsdp and shape:  # rules: fsdp has a known shape
        fsdp = render.render_fsdp(
            layer_class=shape.layer_class, offload_params=dist.offload_params, fsdp=dist.fsdp
        )
    cpus = res.cpus_per_node or facts.cpus
    threads = max(1, cpus // gpn) if not on_gpu else max(1, min(8, cpus // gpn))
    return Plan(
        name=recipe.name,
        run_dir=facts.run_dir,
        recipe=recipe,
        smoke=facts.smoke,
        nodes=nodes,
        gpus_per_node=gpn,
        world_size=world,
        on_gpu=on_gpu,
        micro_batch_size=mbs,
        gradient_accumulation_steps=gas,
        global_batch_size=mbs * gas * world,
        model_shape=shape.to_dict() if shape else None,
        deepspeed=deepspeed,
        fsdp=fsdp,
        accelerate=render.render_accelerate(
            strategy=dist.strategy,
            nodes=nodes,
            gpus_per_node=gpn,
            precision=train.precision,
            on_gpu=on_gpu,
            deepspeed_path=str(run.deepspeed_file) if deepspeed else None,
            fsdp=fsdp,
        ),
        launch=render.render_launch(
            launcher=dist.launcher,
            python=facts.python,
            nodes=nodes,
            gpus_per_node=gpn,
            run_dir=facts.run_dir,
            accelerate_path=str(run.accelerate_file),
        ),
        env=render.render_env(
            on_gpu=on_gpu,
            socket_ifname=dist.nccl_socket_ifname,
            ib_disable=dist.nccl_ib_disable,
            user_env=recipe.env,
            threads_per_rank=threads,
        ),
        secrets=list(recipe.secrets),
        tracking=render.render_tracking(
            trackers=list(train.trackers),
            name=recipe.name,
            run_dir=facts.run_dir,
            project=recipe.tracking.project,
            wandb_mode=recipe.tracking.wandb_mode,
            wandb_entity=recipe.tracking.wandb_entity,
            mlflow_tracking_uri=recipe.tracking.mlflow_tracking_uri,
        ),
        memory=mem,
        serve=_serve_choice(recipe, shape),
        warnings=[*facts.warnings, *advice, *mem_warnings],
        objective=objective_of(recipe),
        objective_args=objective_args(recipe),
        adapter_dtype=resolve_adapter_dtype(recipe),
        dataloader_workers=dataloader_workers_for(recipe, cpus),
        stream=stream_for(recipe),
    )
