"""resolve(recipe, facts) -> Plan: frozen, pure, no I/O.

Everything a run needs is decided here, before anything is allocated: world size and batch
arithmetic, compatibility rules (each refusal says how to fix it), the memory estimate and
the concrete DeepSpeed / accelerate / launch configs. Ranks read only `plan.json`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

from launcher.config import arch, memory, render
from launcher.config.recipe import Recipe
from launcher.data.formats import get_format
from launcher.errors import Problem, RecipeError

PLAN_VERSION = 1


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
    quant_storage: str | None
    model_shape: dict[str, Any] | None
    deepspeed: dict[str, Any] | None
    accelerate: dict[str, Any]
    launch: list[str]
    env: dict[str, str]
    secrets: list[str]
    memory: dict[str, Any] | None
    serve: dict[str, Any]
    warnings: list[str]

    @property
    def deepspeed_path(self) -> str | None:
        return f"{self.run_dir}/deepspeed.json" if self.deepspeed else None

    @property
    def accelerate_path(self) -> str:
        return f"{self.run_dir}/accelerate.yaml"

    @property
    def tiny_arch(self) -> str | None:
        """The architecture of a `tiny:<arch>` base model, built into RUN_DIR/base."""
        name = self.recipe.model.name_or_path
        return name.removeprefix("tiny:") if name.startswith("tiny:") else None

    @property
    def base_model(self) -> str:
        """Where the base model is read from: RUN_DIR/base for tiny:<arch>, else the recipe's."""
        return f"{self.run_dir}/base" if self.tiny_arch else self.recipe.model.name_or_path


def _shape(recipe: Recipe, facts: ClusterFacts) -> arch.ModelShape | None:
    name = recipe.model.name_or_path
    if name.startswith("tiny:"):
        return arch.TINY.get(name.removeprefix("tiny:"))
    if facts.model_config:
        shape = arch.shape_from_config(facts.model_config)
        if shape:
            return shape
    if recipe.model.architecture:
        return arch.BUILTIN.get(recipe.model.architecture) or arch.TINY.get(
            recipe.model.architecture
        )
    return None


def _batch(recipe: Recipe, world: int, problems: list[Problem]) -> tuple[int, int]:
    mbs, gbs = recipe.train.micro_batch_size, recipe.train.global_batch_size
    per_step = mbs * world
    if gbs % per_step:
        lower = max(per_step, gbs // per_step * per_step)
        problems.append(
            Problem(
                "train.global_batch_size",
                f"not divisible by micro_batch_size x world_size = {mbs} x {world} = {per_step}",
                f"use {lower} or {lower + per_step}, or change train.micro_batch_size",
                gbs,
            )
        )
        return mbs, 1
    return mbs, gbs // per_step


def _compat(
    recipe: Recipe,
    shape: arch.ModelShape | None,
    facts: ClusterFacts,
    problems: list[Problem],
    warnings: list[str],
) -> str | None:
    """Known-bad combinations; returns the resolved bnb quant storage dtype."""
    method, dist, train, res = recipe.method, recipe.distributed, recipe.train, recipe.resources
    on_gpu = res.accelerator == "gpu"
    quant_storage: str | None = None
    if method.kind == "qlora":
        compute = method.quant.compute_dtype or recipe.model.dtype
        if dist.strategy in ("zero3", "fsdp"):
            if method.quant.quant_storage not in (None, compute):
                problems.append(
                    Problem(
                        "method.quant.quant_storage",
                        f"QLoRA under {dist.strategy} needs the 4-bit storage dtype equal to the "
                        f"compute dtype ({compute}), or shards of different dtypes cannot be flattened",
                        f"remove it (it is then set to {compute}) or set it to {compute}",
                        method.quant.quant_storage,
                    )
                )
            quant_storage = compute
        else:
            quant_storage = method.quant.quant_storage or "uint8"
    elif "quant" in method.model_fields_set:
        problems.append(
            Problem(
                "method.quant",
                f"4-bit settings with method.kind={method.kind}: "
                "a 4-bit base cannot be fully fine-tuned"
                if method.kind == "full"
                else "4-bit settings only apply to qlora",
                "use method.kind=qlora, or remove method.quant",
            )
        )
    if train.precision == "fp16":
        if not on_gpu:
            problems.append(
                Problem(
                    "train.precision", "fp16 is not supported on CPU", "use bf16 or fp32", "fp16"
                )
            )
        dtype = (facts.model_config or {}).get("dtype") or (facts.model_config or {}).get(
            "torch_dtype"
        )
        if dtype == "bfloat16" or (
            shape and shape.torch_dtype == "bfloat16" and not facts.model_config
        ):
            problems.append(
                Problem(
                    "train.precision",
                    "the model was trained in bf16; fp16 overflows its activations",
                    "use train.precision=bf16 (Ampere or newer GPUs) or fp32",
                    "fp16",
                )
            )
    if recipe.model.dtype == "fp16" and train.precision == "bf16":
        problems.append(
            Problem(
                "model.dtype", "fp16 weights with bf16 training", "use model.dtype=bf16", "fp16"
            )
        )
    if dist.strategy == "fsdp" and not on_gpu:
        problems.append(
            Problem(
                "distributed.strategy",
                "FSDP through accelerate does not run on CPU hosts",
                "use zero2/zero3 (DeepSpeed runs on CPU) or resources.accelerator=gpu",
                "fsdp",
            )
        )
    if dist.offload_params and dist.strategy != "zero3":
        problems.append(
            Problem(
                "distributed.offload_params",
                f"only ZeRO-3 can offload parameters (strategy is {dist.strategy})",
                "use distributed.strategy=zero3 or set offload_params=false",
                True,
            )
        )
    if dist.offload_optimizer and dist.strategy not in ("zero2", "zero3"):
        problems.append(
            Problem(
                "distributed.offload_optimizer",
                f"optimizer offload needs DeepSpeed ZeRO (strategy is {dist.strategy})",
                "use distributed.strategy=zero2 or zero3",
                True,
            )
        )
    if dist.offload_optimizer and train.optimizer != "adamw_torch":
        problems.append(
            Problem(
                "train.optimizer",
                "an offloaded optimizer runs as DeepSpeed's CPU Adam",
                "use train.optimizer=adamw_torch, or offload_optimizer=false",
                train.optimizer,
            )
        )
    task, fmt = recipe.model.task, get_format(recipe.data.format)
    if fmt.task != task:
        problems.append(
            Problem(
                "data.format",
                f"model.task={task} does not go with data.format={fmt.name}",
                f"data.format={fmt.name} trains model.task={fmt.task}",
                fmt.name,
            )
        )
    if task == "sequence_classification" and recipe.model.num_labels is None:
        problems.append(
            Problem(
                "model.num_labels",
                "required for sequence classification",
                "set the number of classes",
            )
        )
    if shape and not shape.is_decoder and task != "sequence_classification":
        problems.append(
            Problem(
                "model.task",
                f"{shape.model_type} is an encoder: it cannot generate",
                "use model.task=sequence_classification",
                task,
            )
        )
    if recipe.data.packing and not fmt.packable:
        problems.append(
            Problem(
                "data.packing",
                f"packing does not apply to {fmt.name} data",
                "set data.packing=false",
                True,
            )
        )
    if recipe.serve.mode == "lora" and method.kind == "full":
        problems.append(
            Problem(
                "serve.mode",
                "a full fine-tune has no adapter to serve",
                "use serve.mode=merged",
                "lora",
            )
        )
    if recipe.eval.enabled and not recipe.serve.enabled:
        problems.append(
            Problem(
                "eval.enabled",
                "evaluation runs against the served model",
                "set serve.enabled=true",
                True,
            )
        )
    if recipe.serve.enabled and task == "sequence_classification":
        problems.append(
            Problem(
                "serve.enabled", "vLLM serves generative models", "set serve.enabled=false", True
            )
        )
    if recipe.serve.engine == "vllm-cpu" and on_gpu:
        warnings.append("serve.engine=vllm-cpu on a GPU cluster: serving will not use the GPUs")
    if (
        shape
        and recipe.serve.tensor_parallel_size
        and shape.num_heads % recipe.serve.tensor_parallel_size
    ):
        problems.append(
            Problem(
                "serve.tensor_parallel_size",
                f"must divide the attention-head count {shape.num_heads}",
                "use a divisor of the head count",
                recipe.serve.tensor_parallel_size,
            )
        )
    for key in recipe.env:
        if key in recipe.secrets:
            problems.append(
                Problem(
                    f"env.{key}",
                    "a secret written into the recipe would land in plans and scripts",
                    f"remove it from the recipe and export {key} in the submitting shell "
                    "(secrets reach the job through the environment only)",
                    "<redacted>",
                )
            )
        elif not key.replace("_", "a").isalnum() or key[0].isdigit():
            problems.append(
                Problem(
                    f"env.{key}",
                    "not an environment variable name",
                    "use letters, digits and _",
                    key,
                )
            )
    if train.max_steps and train.save_steps > train.max_steps:
        warnings.append(
            f"train.save_steps={train.save_steps} > max_steps={train.max_steps}: only the final save happens"
        )
    if shape is None and not recipe.model.name_or_path.startswith("tiny:"):
        warnings.append(
            "model shape unknown offline (no local config.json, no model.architecture): "
            "no memory estimate; set model.architecture to one of " + ", ".join(arch.BUILTIN)
        )
    if recipe.model.architecture and recipe.model.architecture not in {**arch.BUILTIN, **arch.TINY}:
        problems.append(
            Problem(
                "model.architecture",
                "not in the built-in shape table",
                "use one of " + ", ".join([*arch.BUILTIN, *arch.TINY]),
                recipe.model.architecture,
            )
        )
    return quant_storage


_SBATCH_OPTION = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def _script_safe(recipe: Recipe, run_dir: str, problems: list[Problem]) -> None:
    """Values rendered into `#SBATCH` lines (and launch.sh) must stay on their line: a line
    break would end the directive and bash would run the rest of it as a command. Spaces,
    quotes, `$(...)` and backticks are quoted where they land; control characters are not."""
    res = recipe.resources
    values: dict[str, str | None] = {
        "run_dir": run_dir,
        "resources.partition": res.partition,
        "resources.account": res.account,
        "resources.qos": res.qos,
        "resources.constraint": res.constraint,
        "resources.gpu_type": res.gpu_type,
    }
    for key, option in res.sbatch_extra.items():
        if not _SBATCH_OPTION.fullmatch(key):
            problems.append(
                Problem(
                    "resources.sbatch_extra",
                    f"{key!r} is not an sbatch option name",
                    "use the long option without dashes, e.g. mail-type",
                    key,
                )
            )
        values[f"resources.sbatch_extra.{key}"] = str(option)
    for path, value in values.items():
        if value and any(ord(c) < 32 or ord(c) == 127 for c in value):
            problems.append(
                Problem(
                    path if path != "run_dir" or recipe.run_dir else "--run-dir",
                    "contains a line break or control character; in the job script it would "
                    "end the line and run the rest as a shell command",
                    "remove it",
                    value,
                )
            )


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


def resolve(recipe: Recipe, facts: ClusterFacts) -> Plan:
    """Resolve a validated recipe into a frozen Plan; RecipeError lists every conflict."""
    problems: list[Problem] = []
    warnings: list[str] = list(facts.warnings)
    res = recipe.resources
    nodes, gpn = res.nodes, res.gpus_per_node
    world = nodes * gpn
    on_gpu = res.accelerator == "gpu"
    shape = _shape(recipe, facts)
    mbs, gas = _batch(recipe, world, problems)
    quant_storage = _compat(recipe, shape, facts, problems, warnings)
    _script_safe(recipe, facts.run_dir, problems)
    if problems:
        raise RecipeError(problems, f"recipe {recipe.name}")

    train, dist = recipe.train, recipe.distributed
    mem: dict[str, Any] | None = None
    if shape:
        inputs = memory.MemoryInputs(
            shape=shape,
            method=recipe.method.kind,
            dtype=recipe.model.dtype,
            precision=train.precision,
            lora_r=recipe.method.r,
            lora_targets=recipe.method.target_modules,
            optimizer=train.optimizer,
            strategy=dist.strategy,
            world_size=world,
            gpus_per_node=gpn,
            micro_batch_size=mbs,
            seq_len=recipe.data.max_seq_len,
            gradient_checkpointing=train.gradient_checkpointing,
            offload_optimizer=dist.offload_optimizer,
            offload_params=dist.offload_params,
            double_quant=recipe.method.quant.double_quant,
            on_gpu=on_gpu,
            merge_shard_gb=recipe.merge.shard_size_gb,
        )
        mem = memory.estimate(inputs)
        if on_gpu and mem["per_gpu_gib"] > res.gpu_memory_gib:  # type: ignore[operator]
            tips = "; ".join(memory.suggestions(inputs)) or "more GPUs"
            warnings.append(
                f"estimated {mem['per_gpu_gib']} GiB per GPU exceeds {res.gpu_memory_gib} GiB: try {tips}"
            )
        if res.mem_per_node_gib and mem["host_ram_load_gib_per_node"] > res.mem_per_node_gib:  # type: ignore[operator]
            warnings.append(
                f"loading needs ~{mem['host_ram_load_gib_per_node']} GiB of host RAM per node, "
                f"more than resources.mem_per_node_gib={res.mem_per_node_gib}"
            )

    run_dir = facts.run_dir
    deepspeed = render.render_deepspeed(
        strategy=dist.strategy,
        micro_batch_size=mbs,
        gradient_accumulation_steps=gas,
        world_size=world,
        max_grad_norm=train.max_grad_norm,
        precision=train.precision,
        offload_optimizer=dist.offload_optimizer,
        offload_params=dist.offload_params,
        shape=shape,
    )
    ds_path = f"{run_dir}/deepspeed.json" if deepspeed else None
    wrap = {
        "llama": "LlamaDecoderLayer",
        "mistral": "MistralDecoderLayer",
        "qwen2": "Qwen2DecoderLayer",
    }
    accelerate = render.render_accelerate(
        strategy=dist.strategy,
        nodes=nodes,
        gpus_per_node=gpn,
        precision=train.precision,
        on_gpu=on_gpu,
        deepspeed_path=ds_path,
        fsdp_wrap_class=wrap.get(shape.model_type) if shape else None,
        offload_params=dist.offload_params,
    )
    launch = render.render_launch(
        launcher=dist.launcher,
        python=facts.python,
        nodes=nodes,
        gpus_per_node=gpn,
        run_dir=run_dir,
        accelerate_path=f"{run_dir}/accelerate.yaml",
    )
    cpus = res.cpus_per_node or facts.cpus
    threads = max(1, cpus // gpn) if not on_gpu else max(1, min(8, cpus // gpn))
    env = render.render_env(
        on_gpu=on_gpu,
        nccl_timeout_s=dist.nccl_timeout_s,
        socket_ifname=dist.nccl_socket_ifname,
        ib_disable=dist.nccl_ib_disable,
        user_env=recipe.env,
        threads_per_rank=threads,
    )
    return Plan(
        name=recipe.name,
        run_dir=run_dir,
        recipe=recipe,
        smoke=facts.smoke,
        nodes=nodes,
        gpus_per_node=gpn,
        world_size=world,
        on_gpu=on_gpu,
        micro_batch_size=mbs,
        gradient_accumulation_steps=gas,
        global_batch_size=mbs * gas * world,
        quant_storage=quant_storage,
        model_shape=shape.to_dict() if shape else None,
        deepspeed=deepspeed,
        accelerate=accelerate,
        launch=launch,
        env=env,
        secrets=list(recipe.secrets),
        memory=mem,
        serve=_serve_choice(recipe, shape),
        warnings=warnings,
    )
