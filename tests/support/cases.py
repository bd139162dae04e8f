"""Planner inputs more than one test module checks against."""

from __future__ import annotations

from launcher.config.arch import BUILTIN
from launcher.config.memory import MemoryInputs

# Llama 3.1 8B, LoRA r16 on every linear, DDP on 8 GPUs, micro-batch 2 at 2048 tokens
LLAMA8B_LORA = MemoryInputs(
    shape=BUILTIN["llama3.1-8b"],
    method="lora",
    dtype="bf16",
    precision="bf16",
    lora_r=16,
    lora_targets="all-linear",
    optimizer="adamw_torch",
    strategy="ddp",
    world_size=8,
    gpus_per_node=8,
    micro_batch_size=2,
    seq_len=2048,
    gradient_checkpointing=True,
    offload_optimizer=False,
    offload_params=False,
    double_quant=True,
    on_gpu=True,
    merge_shard_gb=5.0,
)
