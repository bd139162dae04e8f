"""distributed.fsdp: FSDP's own settings, split from schema.py, which uses it.

FSDP2 (`version: 2`, the default) is what transformers 5 builds; its settings are the
sharding (full_shard or shard_grad_op: whether parameters are resharded after forward). The
FSDP1 knobs peers' configs name (hybrid sharding, forward/backward prefetch, use_orig_params,
sync_module_states, limit_all_gathers) exist only with `version: 1`, which transformers 5.19
still runs (deprecated: removed in 5.20). Rules: launcher/config/rules_train.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from launcher.config.sections import Section

# the settings that only FSDP1 has
FSDP1_ONLY = (
    "forward_prefetch",
    "backward_prefetch",
    "use_orig_params",
    "sync_module_states",
    "limit_all_gathers",
)


class FsdpConfig(Section):
    """distributed.strategy=fsdp: how FSDP shards (GPU clusters)."""

    version: Literal[1, 2] = Field(
        2,
        description="FSDP2 (fully_shard, transformers' default) or FSDP1 (deprecated). FSDP2 "
        "units, as accelerate wraps: each decoder block, the input embedding, and the output "
        "layer with the final norm (tied embeddings: embedding, norm and output layer in one); "
        "FSDP1: the blocks, the rest in the root.",
    )
    sharding: Literal["full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2"] = Field(
        "full_shard",
        description="full_shard: parameters, gradients and optimizer states sharded, "
        "parameters resharded after forward; shard_grad_op: kept gathered until backward; "
        "hybrid_shard(_zero2): sharded within a node, replicated across nodes (FSDP1 only).",
    )
    forward_prefetch: bool = Field(
        False, description="FSDP1: gather the next block's parameters during forward."
    )
    backward_prefetch: Literal["BACKWARD_PRE", "BACKWARD_POST", "NO_PREFETCH"] = Field(
        "BACKWARD_PRE", description="FSDP1: when the next gather starts during backward."
    )
    use_orig_params: bool = Field(
        True, description="FSDP1: keep the original parameters visible to the optimizer."
    )
    sync_module_states: bool = Field(
        True, description="FSDP1: broadcast rank 0's weights to the others at wrap time."
    )
    limit_all_gathers: bool = Field(
        True, description="FSDP1: rate-limit all-gathers to bound memory (torch's default)."
    )
