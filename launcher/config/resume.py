"""Which recipe changes a checkpoint can resume under (pure: launcher/resume.py reads the
checkpoint and applies the verdict before any process starts).

A checkpoint holds weights of one shape, optimizer state for one set of trainable parameters
in one precision, a learning-rate schedule, and a position in one ordering of one data set,
counted in optimizer steps of one global batch. A change that alters any of those cannot
resume: the run would train something other than what either recipe says. Everything else
(how long to train, the peak learning rate, how often to log, save and evaluate, where and on
how many processes) is applied. A field not listed as resumable is refused: a new setting is
safe to resume under only once someone has said why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from launcher.errors import Problem

# dotted recipe fields (or whole sections, ending in ".") a resumed run may change
RESUMABLE = (
    "name",
    "run_dir",
    "train.max_steps",
    "train.epochs",
    "train.learning_rate",  # applied to the resumed schedule (launcher/train/resume.py)
    "train.micro_batch_size",  # gradient accumulation absorbs it; the global batch stays
    "train.gradient_checkpointing",  # the same gradients, recomputed
    "train.logging_steps",
    "train.save_steps",
    "train.eval_steps",
    "train.keep_last",
    "train.early_stopping_patience",
    "train.nan_policy",
    "train.loss_watchdog_threshold",
    "train.loss_watchdog_patience",
    "train.restarts",
    "train.min_free_disk",
    "train.log_samples",
    "train.dataloader_workers",
    "train.dataloader_prefetch_factor",
    "train.empty_cache_steps",
    "train.ddp_find_unused_parameters",  # the same gradients, found another way
    "train.save_strategy",
    "train.eval_strategy",
    "train.evals_per_epoch",
    "train.trackers",
    "train.tf32",  # GPU kernels: the same training, other rounding
    "train.torch_compile",
    "data.num_proc",  # preprocessing workers: the same rows
    "model.attn_implementation",  # the same mathematics, another kernel
    "distributed.launcher",
    "distributed.nccl_timeout_s",
    "distributed.nccl_socket_ifname",
    "distributed.nccl_ib_disable",
    "distributed.preflight_timeout_s",
    "resources.",  # nodes x GPUs: the checkpoint is resharded (launcher/train/resume.py)
    "merge.",
    "serve.",
    "eval.",
    "tracking.",
)

# why a field cannot change, for the fields a user is most likely to change
WHY = {
    "model.": "the checkpoint holds this model's weights",
    "method.": "the checkpoint's trainable parameters and optimizer state have this shape",
    "data.format": "the checkpoint's data position counts rows of this format",
    "data.max_seq_len": "with packing, the packed rows (and the data position) depend on it",
    "data.packing": "the data position counts packed or unpacked rows",
    "data.": "the data position counts rows of this data set, split and ordered this way",
    "train.global_batch_size": "the data position is counted in steps of the global batch",
    "train.seed": "the seed orders the data; the position would point elsewhere",
    "train.precision": "the optimizer state was kept in this precision",
    "train.max_grad_norm": "DeepSpeed restores the clipping norm from its checkpoint",
    "train.warmup": "the schedule's state belongs to this warmup",
    "train.optimizer": "the optimizer state belongs to this optimizer",
    "train.lr_scheduler": "the schedule's state belongs to this scheduler",
    "distributed.strategy": "DDP, ZeRO and FSDP write different checkpoints",
    "distributed.offload": "the ZeRO optimizer state was written with this offload",
}


@dataclass(frozen=True)
class ResumeVerdict:
    refused: list[Problem] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)  # "train.max_steps 40 -> 80"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"max_steps": 40}} -> {"train.max_steps": 40} (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{name}.")
        else:
            out[name] = value
    return out


def resumable(name: str) -> bool:
    return any(name == f or (f.endswith(".") and name.startswith(f)) for f in RESUMABLE)


def _reason(name: str) -> str:
    for key in sorted(WHY, key=len, reverse=True):
        if name == key or (key.endswith(".") and name.startswith(key)) or name.startswith(key):
            return WHY[key]
    return "tune-launch cannot resume a checkpoint under a change of this setting"


def compare(
    trained: dict[str, Any], asked: dict[str, Any], *, packing: bool, where: str
) -> ResumeVerdict:
    """The recipe the checkpoint was trained under vs the recipe asked now (both as
    model_dump(mode="json") dicts). Fields one of them lacks (a newer or older schema) are
    not compared."""
    old, new = flatten(trained), flatten(asked)
    refused, applied = [], []
    for name in sorted(old.keys() & new.keys()):
        if old[name] == new[name]:
            continue
        change = f"{name} {old[name]!r} -> {new[name]!r}"
        if resumable(name) or (name == "data.max_seq_len" and not packing):
            applied.append(change)
            continue
        refused.append(
            Problem(
                name,
                f"{where} was trained with {old[name]!r}; {_reason(name)}",
                f"--set {name}={_as_set(old[name])} to resume, or start over with --restart "
                "(deletes this run's checkpoints) or a new --run-dir",
                new[name],
            )
        )
    return ResumeVerdict(refused, applied)


def _as_set(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)
