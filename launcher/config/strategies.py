"""The data-parallel strategies (distributed.strategy), one `Strategy` object each.

Code asks `get_strategy(name)` what a strategy does (its DeepSpeed ZeRO stage, what it shards,
what it can offload, whether it runs only on GPUs) instead of comparing names. The schema's
distributed.strategy literal equals the registry's names (tests/unit/test_strategies.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Strategy:
    name: str
    summary: str
    zero_stage: int | None  # DeepSpeed ZeRO's stage; None: not DeepSpeed
    fsdp: bool  # PyTorch FSDP through accelerate: distributed.fsdp applies
    shards_parameters: bool  # each rank holds a slice of the weights
    shards_gradients: bool
    shards_optimizer: bool
    offloads_parameters: bool  # distributed.offload_params can be honoured
    offloads_optimizer: bool  # distributed.offload_optimizer can be honoured
    gpu_only: bool  # accelerate cannot run it on CPU hosts

    @property
    def deepspeed(self) -> bool:
        return self.zero_stage is not None

    @property
    def plain_ddp(self) -> bool:
        """torch's DistributedDataParallel: its own options (find_unused_parameters) apply."""
        return not self.deepspeed and not self.fsdp


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy(
            "ddp", "DistributedDataParallel: every rank holds the whole model", zero_stage=None,
            fsdp=False, shards_parameters=False, shards_gradients=False, shards_optimizer=False,
            offloads_parameters=False, offloads_optimizer=False, gpu_only=False,
        ),
        Strategy(
            "zero2", "DeepSpeed ZeRO-2: gradients and optimizer states sharded", zero_stage=2,
            fsdp=False, shards_parameters=False, shards_gradients=True, shards_optimizer=True,
            offloads_parameters=False, offloads_optimizer=True, gpu_only=False,
        ),
        Strategy(
            "zero3", "DeepSpeed ZeRO-3: weights, gradients and optimizer states sharded",
            zero_stage=3, fsdp=False, shards_parameters=True, shards_gradients=True,
            shards_optimizer=True, offloads_parameters=True, offloads_optimizer=True,
            gpu_only=False,
        ),
        Strategy(
            "fsdp", "FSDP (accelerate): weights, gradients and optimizer states sharded",
            zero_stage=None, fsdp=True, shards_parameters=True, shards_gradients=True,
            shards_optimizer=True, offloads_parameters=True, offloads_optimizer=False,
            gpu_only=True,
        ),
    )
}  # fmt: skip


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(
            f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}"
        ) from None
