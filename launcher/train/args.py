"""The trainer's arguments from the plan: SFTConfig, DPOConfig or TrainingArguments, as the
data format's trainer asks (launcher/data/formats.py). Every value is the plan's; nothing is
recomputed here. Pure: builds the object, launches nothing (tests/train/test_rank_args.py).
"""

from __future__ import annotations

import copy
from typing import Any

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
        "eval_strategy": (t.eval_strategy or t.save_strategy) if has_eval else "no",
        "eval_steps": plan.eval_steps if has_eval else None,
        "report_to": list(t.trackers) or "none",
        "run_name": recipe.name,  # the trackers' run name
        # counted by launcher/train/callbacks.py, one all-reduce per log (the Trainer's count
        # gathers every micro-batch)
        "include_num_input_tokens_seen": "no",
        "log_level": "info",
        "log_level_replica": "warning",
        "deepspeed": plan.deepspeed_path,
        "ddp_timeout": recipe.distributed.nccl_timeout_s,
        "dataloader_num_workers": t.dataloader_workers,
    }
    if t.tf32 is not None:  # rules: GPU only
        args["tf32"] = t.tf32
    if t.torch_compile:  # rules: GPU only
        args["torch_compile"] = True
    if plan.fsdp is not None:
        # fsdp, fsdp_config: the strategy reaches a torchrun rank only here. A copy: the
        # arguments object rewrites its fsdp_config in place, and the plan stays as resolved
        args |= copy.deepcopy(plan.fsdp)
    if not plan.on_gpu:
        args |= {"use_cpu": True, "ddp_backend": "gloo"}
    if t.early_stopping_patience and has_eval:
        args |= {"metric_for_best_model": "eval_loss", "greater_is_better": False}
    return args


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
    if fmt.trainer == "dpo":
        from trl import DPOConfig

        return DPOConfig(
            **common,
            beta=recipe.train.dpo_beta,
            max_length=recipe.data.max_seq_len,
            dataset_num_proc=recipe.data.num_proc,
            trust_remote_code=recipe.model.trust_remote_code,
        )
    from transformers import TrainingArguments

    return TrainingArguments(**common, label_names=["labels"])
