"""What cannot go together: one function per compatibility rule, all run by `check`.

A rule looks at a `Candidate` (the validated recipe, the model's shape and config.json when
known, the run directory) and returns its problems: each names the field, the value seen and
the fix, and any one of them refuses the plan (exit 2). An advice returns warnings: printed,
the plan stands. Rules only judge: the values a run uses are resolved in schema.py (the QLoRA
dtypes) and plan.py (batch split, memory, rendered configs).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from launcher.config import (
    arch,
    rules_data,
    rules_methods,
    rules_quant,
    rules_stream,
    rules_tracking,
    rules_train,
)
from launcher.config.adapter_dtype import adapter_dtype_is_possible
from launcher.config.arch import ModelShape
from launcher.config.methods import get_method
from launcher.config.schema import Recipe
from launcher.config.strategies import get_strategy
from launcher.errors import Problem


@dataclass(frozen=True)
class Candidate:
    """What the rules judge: the recipe, the model's shape (None when unknown offline), the
    local model's config.json (None when not on disk) and the run directory."""

    recipe: Recipe
    shape: ModelShape | None
    model_config: dict[str, Any] | None
    run_dir: str


def fp16_needs_gpu(c: Candidate) -> list[Problem]:
    if c.recipe.train.precision != "fp16" or c.recipe.resources.accelerator == "gpu":
        return []
    return [Problem("train.precision", "fp16 is not supported on CPU", "use bf16 or fp32", "fp16")]


def fp16_not_for_bf16_models(c: Candidate) -> list[Problem]:
    if c.recipe.train.precision != "fp16":
        return []
    if c.model_config:
        trained_in = c.model_config.get("dtype") or c.model_config.get("torch_dtype")
    else:
        trained_in = c.shape.torch_dtype if c.shape else None
    if trained_in != "bfloat16":
        return []
    return [
        Problem(
            "train.precision",
            "the model was trained in bf16; fp16 overflows its activations",
            "use train.precision=bf16 (Ampere or newer GPUs) or fp32",
            "fp16",
        )
    ]


def fp16_weights_not_trained_in_bf16(c: Candidate) -> list[Problem]:
    if c.recipe.model.dtype != "fp16" or c.recipe.train.precision != "bf16":
        return []
    return [
        Problem("model.dtype", "fp16 weights with bf16 training", "use model.dtype=bf16", "fp16")
    ]


def fsdp_needs_gpu(c: Candidate) -> list[Problem]:
    if (
        not get_strategy(c.recipe.distributed.strategy).gpu_only
        or c.recipe.resources.accelerator == "gpu"
    ):
        return []
    return [
        Problem(
            "distributed.strategy",
            "FSDP does not run on CPU hosts",
            "use zero2/zero3 (DeepSpeed runs on CPU) or resources.accelerator=gpu",
            "fsdp",
        )
    ]


def fsdp_needs_known_layer_class(c: Candidate) -> list[Problem]:
    """FSDP wraps each transformer block by its class name; never guess one."""
    if not get_strategy(c.recipe.distributed.strategy).fsdp or c.shape is not None:
        return []
    return [
        Problem(
            "distributed.strategy",
            "FSDP wraps the model's block class, and the model's architecture is not known "
            "offline (no config.json in a local directory or the Hugging Face cache, no "
            "model.architecture)",
            "download the model first (its config.json is then read from the cache), or set "
            "model.architecture to one of " + ", ".join(arch.BUILTIN),
            "fsdp",
        )
    ]


def gpu_settings_need_gpu(c: Candidate) -> list[Problem]:
    """TF32, torch.compile and Liger are GPU settings: transformers refuses TF32 without CUDA,
    Liger's kernels are Triton (GPU), and compiling on the CPU hosts of this launcher is not
    what a recipe tuned for GPUs means."""
    train = c.recipe.train
    if c.recipe.resources.accelerator == "gpu":
        return []
    found = {
        "train.tf32": train.tf32,
        "train.torch_compile": train.torch_compile,
        "model.liger_kernel": c.recipe.model.liger_kernel,
    }
    return [
        Problem(
            path, "a GPU setting on a CPU host", "remove it, or resources.accelerator=gpu", value
        )
        for path, value in found.items()
        if value
    ]


def warmup_given_once(c: Candidate) -> list[Problem]:
    train = c.recipe.train
    explicit_ratio = "warmup_ratio" in train.model_fields_set and train.warmup_ratio > 0
    if train.warmup_steps is None or not explicit_ratio:
        return []
    return [
        Problem(
            "train.warmup_steps",
            f"given together with train.warmup_ratio={train.warmup_ratio}",
            "keep one of them (train.warmup_ratio=0 turns the ratio off)",
            train.warmup_steps,
        )
    ]


def offload_params_needs_zero3(c: Candidate) -> list[Problem]:
    dist = c.recipe.distributed
    if not dist.offload_params or get_strategy(dist.strategy).offloads_parameters:
        return []  # fsdp: FSDP2's CPU offload (launcher/config/render.py render_fsdp)
    return [
        Problem(
            "distributed.offload_params",
            f"only ZeRO-3 and FSDP can offload parameters (strategy is {dist.strategy})",
            "use distributed.strategy=zero3 or fsdp, or set offload_params=false",
            True,
        )
    ]


def offload_optimizer_needs_zero(c: Candidate) -> list[Problem]:
    dist = c.recipe.distributed
    if not dist.offload_optimizer or get_strategy(dist.strategy).offloads_optimizer:
        return []
    return [
        Problem(
            "distributed.offload_optimizer",
            f"optimizer offload needs DeepSpeed ZeRO (strategy is {dist.strategy})",
            "use distributed.strategy=zero2 or zero3",
            True,
        )
    ]


def offload_optimizer_needs_adamw_torch(c: Candidate) -> list[Problem]:
    optimizer = c.recipe.train.optimizer
    if not c.recipe.distributed.offload_optimizer or optimizer == "adamw_torch":
        return []
    return [
        Problem(
            "train.optimizer",
            "an offloaded optimizer runs as DeepSpeed's CPU Adam",
            "use train.optimizer=adamw_torch, or offload_optimizer=false",
            optimizer,
        )
    ]


def encoder_cannot_generate(c: Candidate) -> list[Problem]:
    task = c.recipe.model.task
    if c.shape is None or c.shape.is_decoder or task == "sequence_classification":
        return []
    return [
        Problem(
            "model.task",
            f"{c.shape.model_type} is an encoder: it cannot generate",
            "use model.task=sequence_classification",
            task,
        )
    ]


def lora_serving_needs_an_adapter(c: Candidate) -> list[Problem]:
    if c.recipe.serve.mode != "lora" or c.recipe.method.kind != "full":
        return []
    return [
        Problem(
            "serve.mode",
            "a full fine-tune has no adapter to serve",
            "use serve.mode=merged",
            "lora",
        )
    ]


def eval_needs_serving(c: Candidate) -> list[Problem]:
    """Except for the methods vLLM cannot serve: their eval generates in-process."""
    if not c.recipe.eval.enabled or c.recipe.serve.enabled:
        return []
    if get_method(c.recipe.method.kind).in_process_eval:
        return []
    if c.recipe.model.task == "sequence_classification":  # scored in-process (reward_eval)
        return []
    return [
        Problem(
            "eval.enabled",
            "evaluation runs against the served model",
            "set serve.enabled=true",
            True,
        )
    ]


def serving_needs_a_generative_model(c: Candidate) -> list[Problem]:
    if not c.recipe.serve.enabled or c.recipe.model.task != "sequence_classification":
        return []
    return [
        Problem("serve.enabled", "vLLM serves generative models", "set serve.enabled=false", True)
    ]


def tensor_parallel_divides_heads(c: Candidate) -> list[Problem]:
    tp = c.recipe.serve.tensor_parallel_size
    if c.shape is None or not tp or c.shape.num_heads % tp == 0:
        return []
    return [
        Problem(
            "serve.tensor_parallel_size",
            f"must divide the attention-head count {c.shape.num_heads}",
            "use a divisor of the head count",
            tp,
        )
    ]


def secrets_stay_out_of_env(c: Candidate) -> list[Problem]:
    return [
        Problem(
            f"env.{key}",
            "a secret written into the recipe would land in plans and scripts",
            f"remove it from the recipe and export {key} in the submitting shell "
            "(secrets reach the job through the environment only)",
            "<redacted>",
        )
        for key in c.recipe.env
        if key in c.recipe.secrets
    ]


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def env_keys_are_variable_names(c: Candidate) -> list[Problem]:
    return [
        Problem(f"env.{key}", "not an environment variable name", "use letters, digits and _", key)
        for key in c.recipe.env
        if not _ENV_NAME.fullmatch(key)
    ]


def architecture_is_in_the_table(c: Candidate) -> list[Problem]:
    """A real model's architecture is a key of the built-in table: a tiny shape's name
    (llama, qwen2) would plan a 128-wide test model's numbers for it."""
    name, model = c.recipe.model.architecture, c.recipe.model.name_or_path
    tiny = model.startswith("tiny:")
    if not name or name in arch.BUILTIN or (tiny and name in arch.TINY):
        return []
    why = (
        f"{name!r} names a tiny test shape, not {model}'s"
        if name in arch.TINY
        else "not in the built-in shape table"
    )
    fix = "use one of " + ", ".join(arch.BUILTIN)
    if not tiny:
        fix += ", or remove it and put the model's config.json in the Hugging Face cache"
    return [Problem("model.architecture", why, fix, name)]


def architecture_agrees_with_config(c: Candidate) -> list[Problem]:
    """model.architecture must not contradict the model's own config.json."""
    name, config = c.recipe.model.architecture, c.model_config
    if not name or not config or name not in arch.BUILTIN:
        return []
    found = config.get("model_type")
    if arch.family(name) == found or found is None:
        return []
    return [
        Problem(
            "model.architecture",
            f"{name} is a {arch.family(name)} model, but the model's config.json says "
            f"model_type={found}",
            "remove model.architecture (the config.json is read)",
            name,
        )
    ]


def global_batch_divides_evenly(c: Candidate) -> list[Problem]:
    train, res = c.recipe.train, c.recipe.resources
    world = res.nodes * res.gpus_per_node
    per_step = train.micro_batch_size * world
    if train.global_batch_size % per_step == 0:
        return []
    lower = max(per_step, train.global_batch_size // per_step * per_step)
    return [
        Problem(
            "train.global_batch_size",
            f"not divisible by micro_batch_size x world_size = {train.micro_batch_size} x "
            f"{world} = {per_step}",
            f"use {lower} or {lower + per_step}, or change train.micro_batch_size",
            train.global_batch_size,
        )
    ]


_SBATCH_OPTION = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def sbatch_extra_keys_are_options(c: Candidate) -> list[Problem]:
    return [
        Problem(
            "resources.sbatch_extra",
            f"{key!r} is not an sbatch option name",
            "use the long option without dashes, e.g. mail-type",
            key,
        )
        for key in c.recipe.resources.sbatch_extra
        if not _SBATCH_OPTION.fullmatch(key)
    ]


def script_values_stay_on_their_line(c: Candidate) -> list[Problem]:
    """Values rendered into `#SBATCH` lines (and launch.sh) must stay on their line: a line
    break would end the directive and bash would run the rest of it as a command. Spaces,
    quotes, `$(...)` and backticks are quoted where they land; control characters are not."""
    res = c.recipe.resources
    values: dict[str, str | None] = {
        "--run-dir" if not c.recipe.run_dir else "run_dir": c.run_dir,
        "resources.partition": res.partition,
        "resources.account": res.account,
        "resources.qos": res.qos,
        "resources.constraint": res.constraint,
        "resources.gpu_type": res.gpu_type,
    }
    values |= {f"resources.sbatch_extra.{k}": str(v) for k, v in res.sbatch_extra.items()}
    return [
        Problem(
            path,
            "contains a line break or control character; in the job script it would end the "
            "line and run the rest as a shell command",
            "remove it",
            value,
        )
        for path, value in values.items()
        if value and any(ord(ch) < 32 or ord(ch) == 127 for ch in value)
    ]


def cpu_engine_on_gpus(c: Candidate) -> list[str]:
    if c.recipe.serve.engine != "vllm-cpu" or c.recipe.resources.accelerator != "gpu":
        return []
    return ["serve.engine=vllm-cpu on a GPU cluster: serving will not use the GPUs"]


def save_steps_within_max_steps(c: Candidate) -> list[str]:
    train = c.recipe.train
    if not train.max_steps or train.save_steps <= train.max_steps:
        return []
    return [
        f"train.save_steps={train.save_steps} > max_steps={train.max_steps}: "
        "only the final save happens"
    ]


def shape_known_for_the_estimate(c: Candidate) -> list[str]:
    if c.shape is not None or c.recipe.model.name_or_path.startswith("tiny:"):
        return []
    return [
        "model shape unknown offline (no config.json in a local directory or the Hugging "
        "Face cache, no model.architecture): no memory estimate, and DeepSpeed's bucket sizes "
        'are left to DeepSpeed ("auto", resolved from the loaded model); download the model '
        "first, or set model.architecture to one of " + ", ".join(arch.BUILTIN)
    ]


def saved_modules_known_for_the_estimate(c: Candidate) -> list[str]:
    method = c.recipe.method
    if c.shape is None or method.kind == "full":
        return []
    return [
        f"method.modules_to_save: {name!r} is not a module the memory planner knows; "
        "the estimate leaves its trainable copy out"
        for name in method.modules_to_save
        if c.shape.module_params(name) is None
    ]


Rule = Callable[[Candidate], list[Problem]]
Advice = Callable[[Candidate], list[str]]

RULES: list[Rule] = [  # data rules: rules_data.py, rules_stream.py
    global_batch_divides_evenly,
    rules_quant.qlora_storage_equals_compute_when_sharded,
    rules_quant.quant_settings_need_qlora,
    rules_quant.eight_bit_settings_fit,
    fp16_needs_gpu,
    fp16_not_for_bf16_models,
    fp16_weights_not_trained_in_bf16,
    fsdp_needs_gpu,
    fsdp_needs_known_layer_class,
    gpu_settings_need_gpu,
    warmup_given_once,
    rules_train.evals_per_epoch_counts_epochs,
    rules_train.overlap_comm_is_deepspeeds,
    rules_train.loader_settings_fit,
    rules_train.fsdp_settings_fit_their_version,
    rules_train.weight_decay_exempt_needs_decay,
    offload_params_needs_zero3,
    offload_optimizer_needs_zero,
    offload_optimizer_needs_adamw_torch,
    rules_data.format_trains_the_task,
    rules_data.classification_needs_num_labels,
    encoder_cannot_generate,
    rules_data.packing_needs_packable_format,
    rules_data.packing_needs_a_length,
    rules_data.weights_given_for_every_source_or_none,
    rules_data.validation_sources_are_used_whole,
    rules_data.subset_and_split_are_a_hub_datasets,
    rules_stream.streaming_needs_a_length_free_recipe,
    rules_stream.shuffle_buffer_is_a_streams,
    rules_tracking.tracking_settings_need_their_tracker,
    rules_tracking.wandb_online_needs_the_api_key,
    rules_tracking.mlflow_store_is_a_database_or_server,
    lora_serving_needs_an_adapter,
    rules_methods.lora_options_need_lora,
    adapter_dtype_is_possible,
    rules_methods.virtual_token_options_need_prompt_learning,
    rules_methods.unmergeable_methods_are_not_merged_or_served,
    rules_methods.lora_module_serving_is_plain_lora,
    rules_methods.prompt_learning_not_under_zero3,
    rules_methods.prefix_tuning_without_gradient_checkpointing,
    rules_methods.preference_settings_need_preference_pairs,
    rules_methods.reward_model_has_one_output,
    rules_methods.head_dropout_needs_a_head,
    rules_methods.kto_needs_two_rows_per_batch,
    eval_needs_serving,
    serving_needs_a_generative_model,
    tensor_parallel_divides_heads,
    secrets_stay_out_of_env,
    env_keys_are_variable_names,
    architecture_is_in_the_table,
    architecture_agrees_with_config,
    sbatch_extra_keys_are_options,
    script_values_stay_on_their_line,
]

ADVICE: list[Advice] = [
    rules_train.fsdp1_is_deprecated,
    cpu_engine_on_gpus,
    save_steps_within_max_steps,
    shape_known_for_the_estimate,
    saved_modules_known_for_the_estimate,
]


def check(candidate: Candidate) -> tuple[list[Problem], list[str]]:
    """Every rule's problems and every advice's warnings, in the order of RULES and ADVICE."""
    problems = [p for rule in RULES for p in rule(candidate)]
    warnings = [w for advice in ADVICE for w in advice(candidate)]
    return problems, warnings
