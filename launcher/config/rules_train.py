"""The train- and distributed-section rules that fit nowhere else, run from the one list in
rules.py."""

from __future__ import annotations

from typing import TYPE_CHECKING

from launcher.config.schema_fsdp import FSDP1_ONLY
from launcher.config.strategies import get_strategy
from launcher.errors import Problem

if TYPE_CHECKING:
    from launcher.config.rules import Candidate


def evals_per_epoch_counts_epochs(c: Candidate) -> list[Problem]:
    """train.evals_per_epoch divides an epoch: it needs epochs (not max_steps) and is the one
    evaluation cadence given."""
    train = c.recipe.train
    if train.evals_per_epoch is None:
        return []
    clashes = {
        "train.max_steps": (train.max_steps, "train by train.epochs, or use train.eval_steps"),
        "train.eval_steps": (train.eval_steps, "keep one of them"),
        "train.eval_strategy": (train.eval_strategy, "keep one of them"),
    }
    return [
        Problem(
            "train.evals_per_epoch",
            f"given together with {path}={value}: evaluations per epoch set the cadence",
            fix,
            train.evals_per_epoch,
        )
        for path, (value, fix) in clashes.items()
        if value is not None
    ]


def overlap_comm_is_deepspeeds(c: Candidate) -> list[Problem]:
    """distributed.overlap_comm is a ZeRO setting: DDP and FSDP always overlap their
    reductions with the backward pass, so `false` could not be honoured there."""
    dist = c.recipe.distributed
    if dist.overlap_comm or get_strategy(dist.strategy).deepspeed:
        return []
    return [
        Problem(
            "distributed.overlap_comm",
            f"false is a DeepSpeed ZeRO setting; distributed.strategy={dist.strategy} always "
            "overlaps its gradient reduction with the backward pass",
            "remove it, or use distributed.strategy=zero2 or zero3",
            False,
        )
    ]


def loader_settings_fit(c: Candidate) -> list[Problem]:
    """A prefetch factor needs loader workers (torch refuses it without); the DDP
    unused-parameter search exists only under DDP."""
    train, problems = c.recipe.train, []
    if train.dataloader_prefetch_factor and train.dataloader_workers == 0:
        problems.append(
            Problem(
                "train.dataloader_prefetch_factor",
                "batches are prefetched by loader workers; train.dataloader_workers is 0",
                "set train.dataloader_workers (a number or auto), or remove it",
                train.dataloader_prefetch_factor,
            )
        )
    strategy = c.recipe.distributed.strategy
    if train.ddp_find_unused_parameters is not None and not get_strategy(strategy).plain_ddp:
        problems.append(
            Problem(
                "train.ddp_find_unused_parameters",
                f"a DDP setting; distributed.strategy={strategy} does not use DDP",
                "remove it, or use distributed.strategy=ddp",
                train.ddp_find_unused_parameters,
            )
        )
    return problems


def fsdp_settings_fit_their_version(c: Candidate) -> list[Problem]:
    """distributed.fsdp only under strategy fsdp; FSDP1's knobs and hybrid sharding only with
    version 1 (FSDP2 has no such settings: transformers would drop them silently)."""
    dist = c.recipe.distributed
    given = dist.fsdp.model_fields_set
    if not given:
        return []
    if not get_strategy(dist.strategy).fsdp:
        return [
            Problem(
                f"distributed.fsdp.{name}",
                f"an FSDP setting; distributed.strategy={dist.strategy}",
                "use distributed.strategy=fsdp, or remove it",
                getattr(dist.fsdp, name),
            )
            for name in sorted(given)
        ]
    if dist.fsdp.version == 1:
        return []
    problems = [
        Problem(
            f"distributed.fsdp.{name}",
            "an FSDP1 setting; FSDP2 (distributed.fsdp.version 2) has no such setting",
            "set distributed.fsdp.version=1 (deprecated by transformers), or remove it",
            getattr(dist.fsdp, name),
        )
        for name in FSDP1_ONLY
        if name in given
    ]
    if dist.fsdp.sharding.startswith("hybrid"):
        problems.append(
            Problem(
                "distributed.fsdp.sharding",
                "hybrid sharding is FSDP1's (transformers builds FSDP2 with full_shard or "
                "shard_grad_op only)",
                "set distributed.fsdp.version=1, or sharding full_shard / shard_grad_op",
                dist.fsdp.sharding,
            )
        )
    return problems


def fsdp1_is_deprecated(c: Candidate) -> list[str]:
    dist = c.recipe.distributed
    if not get_strategy(dist.strategy).fsdp or dist.fsdp.version != 1:
        return []
    return [
        "distributed.fsdp.version=1: FSDP1 is deprecated by transformers (5.19 runs it and "
        "warns; 5.20 removes it)"
    ]


def weight_decay_exempt_needs_decay(c: Candidate) -> list[Problem]:
    """train.weight_decay_exempt chooses which parameters decay; with no decay it would say
    something the run does not do."""
    train = c.recipe.train
    if train.weight_decay_exempt == "bias_and_norm" or train.weight_decay > 0:
        return []
    return [
        Problem(
            "train.weight_decay_exempt",
            f"{train.weight_decay_exempt}: every parameter would decay by train.weight_decay, "
            "which is 0",
            "set train.weight_decay (torch.optim.AdamW's default is 0.01), or remove it",
            train.weight_decay_exempt,
        )
    ]
