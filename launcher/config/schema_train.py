"""The recipe's `train` section, split from schema.py, which re-exports it."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from launcher.config.sections import Section, Tracker


class TrainConfig(Section):
    epochs: float = Field(1.0, gt=0, description="Passes over the data (ignored with max_steps).")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs.")
    micro_batch_size: int = Field(1, gt=0, description="Examples per process per forward pass.")
    global_batch_size: int = Field(
        8,
        gt=0,
        description="Examples per optimizer step over all processes; gradient "
        "accumulation is derived from it.",
    )
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps for warmup.")
    warmup_steps: int | None = Field(
        None, ge=0, description="Warmup in optimizer steps, instead of train.warmup_ratio."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    weight_decay_exempt: Literal["bias_and_norm", "none"] = Field(
        "bias_and_norm",
        description="Parameters train.weight_decay skips. bias_and_norm: the Trainer's rule, "
        "biases and normalisation weights get no decay; none: every trained parameter decays "
        "(torch.optim.AdamW over model.parameters(), as torchtune builds it).",
    )
    max_grad_norm: float | None = Field(
        1.0, ge=0, description="Gradient clipping norm; 0 or null: no clipping."
    )
    optimizer: Literal[
        "adamw_torch",
        "adamw_torch_fused",
        "adamw_bnb_8bit",
        "paged_adamw_8bit",
        "paged_adamw_32bit",
        "adafactor",
    ] = Field(
        "adamw_torch",
        description="Optimizer by name (transformers' names); adamw_torch_fused: torch's fused "
        "AdamW kernel, one launch per parameter group.",
    )
    dataloader_workers: Annotated[int, Field(ge=0, le=64)] | Literal["auto"] = Field(
        0,
        description="Worker processes loading batches, per rank (0: in the rank); auto: oumi's "
        "rule, 2 per GPU of the node, at most 8 and a quarter of the node's CPUs, at least 1 "
        "(decided in the plan).",
    )
    dataloader_prefetch_factor: int | None = Field(
        None,
        gt=0,
        le=1024,
        description="Batches each loader worker prepares ahead (torch's prefetch_factor); "
        "needs dataloader_workers > 0. Default: torch's (2).",
    )
    empty_cache_steps: int | None = Field(
        None,
        gt=0,
        description="Empty the accelerator's memory cache every N steps (transformers' "
        "torch_empty_cache_steps; oumi's empty_device_cache_steps).",
    )
    ddp_find_unused_parameters: bool | None = Field(
        None,
        description="distributed.strategy=ddp: search the graph for unused parameters after "
        "each backward. Default: off for adapters on a dense model (all used), else the "
        "Trainer's choice.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations (non-reentrant)."
    )
    precision: Literal["bf16", "fp16", "fp32"] = Field(
        "bf16", description="Mixed-precision mode of training."
    )
    seed: int = Field(42, description="Seed of weights init (adapters), dropout and data order.")
    save_steps: int = Field(100, gt=0, description="Checkpoint every N optimizer steps.")
    save_strategy: Literal["steps", "epoch"] = Field(
        "steps", description="Checkpoint every train.save_steps steps, or at each epoch's end."
    )
    eval_steps: int | None = Field(
        None, gt=0, description="Evaluate every N steps; default save_steps."
    )
    evals_per_epoch: int | None = Field(
        None,
        gt=0,
        le=1000,
        description="Evaluate N times per epoch, evenly (axolotl's evals_per_epoch): every "
        "ceil(total steps / (epochs x N)) steps; with train.epochs, not max_steps.",
    )
    eval_strategy: Literal["steps", "epoch"] | None = Field(
        None,
        description="Evaluate every train.eval_steps steps, or at each epoch's end; default: "
        "train.save_strategy.",
    )
    trackers: list[Tracker] = Field(
        default_factory=lambda: list[Tracker](["tensorboard"]),
        description="Metric trackers the Trainer reports to ([] for none): tensorboard "
        "(RUN_DIR/tb), wandb, mlflow (settings: the tracking section); metrics.jsonl "
        "is always written.",
    )
    tf32: bool | None = Field(
        None,
        description="GPU only: TF32 matmuls on Ampere or newer (transformers' tf32); "
        "default: PyTorch's.",
    )
    torch_compile: bool = Field(
        False, description="GPU only: compile the model with torch.compile (inductor)."
    )
    logging_steps: int = Field(10, gt=0, description="Log metrics every N steps.")
    keep_last: int = Field(2, ge=1, description="Complete checkpoints kept on disk.")
    log_samples: bool = Field(
        False,
        description="Log which training rows each optimizer step used, per rank, to "
        "RUN_DIR/logs/samples-rank{N}.jsonl (audits data order across resumes).",
    )
    loss_watchdog_threshold: float | None = Field(
        None,
        gt=0,
        description="Fail the run when the logged training loss stays above this for "
        "train.loss_watchdog_patience logged steps in a row (axolotl's loss watchdog): the "
        "last checkpoint kept, nothing merged (launcher/train/watchdog.py).",
    )
    loss_watchdog_patience: int = Field(
        3, gt=0, description="Logged steps in a row above train.loss_watchdog_threshold."
    )
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after N evaluations without a better validation loss."
    )
    dpo_beta: float = Field(
        0.1,
        gt=0,
        description="Beta of the preference objectives: DPO's and KTO's KL weight, ORPO's "
        "odds-ratio weight (lambda), SimPO's reward scale (the SimPO paper uses 2 to 2.5).",
    )
    preference_loss: Literal["dpo", "orpo", "simpo"] = Field(
        "dpo",
        description="The preference format's objective: dpo (TRL DPOTrainer, a frozen "
        "reference model), orpo (TRL ORPOTrainer: SFT loss + odds ratio, no reference) or "
        "simpo (TRL CPOTrainer, loss_type=simpo: length-normalised margin, no reference).",
    )
    simpo_gamma: float = Field(
        0.5, ge=0, description="SimPO's target reward margin gamma (preference_loss=simpo)."
    )
    kto_desirable_weight: float = Field(
        1.0, gt=0, description="KTO: the loss weight of desirable rows (TRL's desirable_weight)."
    )
    kto_undesirable_weight: float = Field(
        1.0,
        gt=0,
        description="KTO: the loss weight of undesirable rows (TRL's undesirable_weight).",
    )
    kto_kl_pairing: Literal["micro_batch", "previous_row"] = Field(
        "micro_batch",
        description="KTO: where each row's KL completion (another row's) comes from. "
        "micro_batch: the previous row of its micro-batch, the rows in fixed order (TRL's "
        "KTOTrainer; needs train.micro_batch_size >= 2); previous_row: the previous row of "
        "the data, in batches of 1000 rows within each of data.num_proc shards, the rows then "
        "shuffled (LLaMA-Factory's feedback processor; any micro-batch; not with DeepSpeed).",
    )
    nan_policy: Literal["stop", "skip"] = Field(
        "stop", description="Non-finite loss: stop the run, or skip the step."
    )
    restarts: int = Field(0, ge=0, le=100, description="Local restarts after a rank dies.")
    min_free_disk: Literal["refuse", "warn"] = Field(
        "refuse", description="When free disk is below the planned checkpoint size."
    )
