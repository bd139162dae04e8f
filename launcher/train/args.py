"""The trainer's arguments from the plan: SFTConfig, the preference and reward objectives'
TRL configs (DPO, KTO, ORPO, CPO for SimPO, Reward) or TrainingArguments, as the plan's
objective asks (launcher/data/formats.py). Every value is the plan's; nothing is
recomputed here. Pure: builds the object, launches nothing (tests/train/test_rank_args.py).
"""

from __future__ import annotations

import copy
import importlib
from typing import Any

from launcher.config.methods import OBJECTIVES
from launcher.config.plan import Plan
from launcher.data.formats import get_format
from launcher.rundir import RunDir


def common_args(plan: Plan, run: RunDir, *, has_eval: bool) -> dict[str, Any]:
    """The keyword arguments every trainer takes. Precision flags equal the DeepSpeed JSON's
    (HF refuses a mismatch); FSDP options are the plan's; on CPU hosts, the CPU with gloo."""
    recipe, t = plan.recipe, plan.recipe.train
    args: dict[str, Any] = {
        "output_dir": str(run.checkpoints),
        "per_device_train_batch_size": plan.micro_batch_size,
        "per_device_eval_batch_size": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "num_train_epochs": t.epochs,
        "max_steps": t.max_steps or -1,
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler,
        # an int counts steps; a float in [0, 1) is a ratio of the total steps
        "warmup_steps": t.warmup_steps if t.warmup_steps is not None else t.warmup_ratio,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm or 0.0,  # 0: the Trainer does not clip
        "optim": t.optimizer,
        "bf16": t.precision == "bf16",
        "fp16": t.precision == "fp16",
        "gradient_checkpointing": t.gradient_checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False}
        if t.gradient_checkpointing
        else None,
        "seed": t.seed,
        "data_seed": t.seed,
        "logging_steps": t.logging_steps,
        "logging_first_step": True,
        "save_strategy": t.save_strategy,
        "save_steps": t.save_steps,
        "save_total_limit": None,  # pruning is ours: only complete checkpoints count
        "eval_strategy": eval_strategy(plan) if has_eval else "no",
        "eval_steps": eval_cadence(plan) if has_eval else None,
        "report_to": list(t.trackers) or "none",
        "run_name": recipe.name,  # the trackers' run name
        # counted by launcher/train/callbacks.py, one all-reduce per log (the Trainer's count
        # gathers every micro-batch)
        "include_num_input_tokens_seen": "no",
        "log_level": "info",
        "log_level_replica": "warning",
        "deepspeed": plan.deepspeed_path,
        "ddp_timeout": recipe.distributed.nccl_timeout_s,
        "dataloader_num_workers": plan.dataloader_workers,
    }
    if t.dataloader_prefetch_factor:  # rules: with workers
        args["dataloader_prefetch_factor"] = t.dataloader_prefetch_factor
    if t.empty_cache_steps:
        args["torch_empty_cache_steps"] = t.empty_cache_steps
    if t.tf32 is not None:  # rules: GPU only
        args["tf32"] = t.tf32
    if t.torch_compile:  # rules: GPU only
        args["torch_compile"] = True
    if recipe.model.liger_kernel:  # rules: GPU only
        args["use_liger_kernel"] = True
    if plan.fsdp is not None:
        # fsdp, fsdp_config: the strategy reaches a torchrun rank only here. A copy: the
        # arguments object rewrites its fsdp_config in place, and the plan stays as resolved
        args |= copy.deepcopy(plan.fsdp)
    if not plan.on_gpu:
        args |= {"use_cpu": True, "ddp_backend": "gloo"}
    if t.early_stopping_patience and has_eval:
        args |= {"metric_for_best_model": "eval_loss", "greater_is_better": False}
    return args


def eval_strategy(plan: Plan) -> str:
    """steps, or epoch: train.eval_strategy, steps for evals_per_epoch, else save_strategy."""
    t = plan.recipe.train
    if t.evals_per_epoch:
        return "steps"
    return t.eval_strategy or t.save_strategy


def eval_cadence(plan: Plan) -> float:
    """The Trainer's eval_steps: N steps, or for train.evals_per_epoch a ratio of the total
    steps (the Trainer evaluates every ceil(total x ratio) steps: total / (epochs x N))."""
    t = plan.recipe.train
    if t.evals_per_epoch:
        return 1.0 / (t.epochs * t.evals_per_epoch)
    return plan.eval_steps


def training_args(plan: Plan, run: RunDir, *, has_eval: bool, universal: bool = False) -> Any:
    """The arguments object of the format's trainer."""
    recipe = plan.recipe
    fmt = get_format(recipe.data.format)
    common = common_args(plan, run, has_eval=has_eval)
    if universal and plan.deepspeed:
        # the checkpoint was written on another world size and converted to DeepSpeed's
        # universal form (launcher/train/resume.py): this attempt's engine loads that
        common["deepspeed"] = {**plan.deepspeed, "checkpoint": {"load_universal": True}}
    if fmt.trainer == "sft":
        from trl import SFTConfig

        return SFTConfig(
            **common,
            max_length=recipe.data.max_seq_len,
            packing=recipe.data.packing,
            packing_strategy=plan.packing_strategy,
            completion_only_loss=fmt.completion_only and recipe.data.completion_only_loss,
            dataset_text_field="text",
            dataset_num_proc=recipe.data.num_proc,
            trust_remote_code=recipe.model.trust_remote_code,
        )
    if plan.objective_args:  # DPO, ORPO, SimPO, KTO, reward: the plan's own fields
        return objective_config(plan.objective)(
            **common,
            **plan.objective_args,
            dataset_num_proc=recipe.data.num_proc,
            trust_remote_code=recipe.model.trust_remote_code,
        )
    from transformers import TrainingArguments

    return TrainingArguments(**common, label_names=["labels"])


def objective_config(objective: str) -> type:
    """The TRL config class of a preference or reward objective (methods.OBJECTIVES' `config`)."""
    module, _, name = OBJECTIVES[objective].config.rpartition(".")
    cls: type = getattr(importlib.import_module(module), name)
    return cls
