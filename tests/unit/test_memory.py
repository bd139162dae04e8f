"""The memory estimate for a known case agrees with a hand calculation written out here."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from launcher.config.arch import BUILTIN
from launcher.config.memory import GIB, estimate
from tests.support.cases import LLAMA8B_LORA


def test_llama8b_lora_ddp_by_hand() -> None:
    est = estimate(LLAMA8B_LORA)
    # parameters of Llama 3.1 8B: 8,030,261,248 (the published count)
    assert est["params"] == 8_030_261_248
    # LoRA r=16 on q,k,v,o,gate,up,down of 32 layers:
    # q: 16*(4096+4096), k,v: 16*(4096+1024) each, o: 16*(4096+4096), gate/up: 16*(4096+14336) each,
    # down: 16*(14336+4096) -> per layer 16*(8192+5120+5120+8192+18432*3) = 16*81,920 = 1,310,720
    assert est["trainable_params"] == 32 * 1_310_720 == 41_943_040
    # bf16 base + fp32 adapters (peft upcasts them: method.adapter_dtype auto under DDP)
    weights = 8_030_261_248 * 2 + 41_943_040 * 4
    grads = 41_943_040 * 4
    optim = 41_943_040 * 8  # two fp32 Adam moments
    s, b, h, a = 2048, 2, 4096, 32
    # sdpa (the default attention) never stores the s x s scores: 34*s*b*h per layer
    acts = 32 * 2 * s * b * h + s * b * h * 34 + b * s * 128256 * 10
    total = weights + grads + optim + acts + GIB
    assert est["per_gpu_gib"] == pytest.approx(total / GIB, abs=1e-3)
    assert est["breakdown_gib"]["weights"] == pytest.approx(weights / GIB, abs=1e-3)
    # torchtune's bf16 adapters: weights, gradients and torch AdamW's moments in bf16
    bf16 = estimate(replace(LLAMA8B_LORA, adapter_dtype="bf16"))
    saved = 41_943_040 * (2 + 2 + 4)
    assert bf16["per_gpu_gib"] == pytest.approx((total - saved) / GIB, abs=1e-3)
    # eager attention stores them: 5*a*s^2*b more in the one layer held in full
    eager = estimate(replace(LLAMA8B_LORA, attention="eager"))
    scores = 5 * a * s * s * b
    assert eager["per_gpu_gib"] == pytest.approx((total + scores) / GIB, abs=1e-3)


def test_zero3_qlora_shards_weights_over_world() -> None:
    shape = BUILTIN["llama3.1-70b"]
    qlora = replace(
        LLAMA8B_LORA,
        shape=shape,
        method="qlora",
        lora_r=64,
        optimizer="paged_adamw_8bit",
        micro_batch_size=1,
        seq_len=4096,
    )
    one = estimate(replace(qlora, strategy="ddp", world_size=1))
    z3 = estimate(replace(qlora, strategy="zero3", world_size=16))
    assert z3["breakdown_gib"]["weights"] == pytest.approx(
        one["breakdown_gib"]["weights"] / 16, rel=1e-3
    )
    # 4-bit: the blocks' linear weights at 0.5 byte + double-quant constants, the rest bf16
    q = shape.quantizable_params()
    expected = q * 0.5 + q / 64 + q / 64 / 256 * 4 + (shape.total_params() - q) * 2
    assert one["weight_bytes"] == int(expected)
    # an 8-bit base (method.quant.bits): a byte a weight plus one fp32 scale per output row
    int8 = estimate(replace(qlora, strategy="ddp", world_size=1, quant_bits=8))
    rows = q / shape.hidden_size
    assert int8["weight_bytes"] == int(q * 1 + rows * 4 + (shape.total_params() - q) * 2)
    # checkpointing cuts activations
    no_ckpt = estimate(
        replace(qlora, strategy="zero3", world_size=16, gradient_checkpointing=False)
    )
    assert no_ckpt["breakdown_gib"]["activations"] > 5 * z3["breakdown_gib"]["activations"]


def test_long_sequences_are_planned_with_the_attention_kernel_and_named_as_the_fix(
    tmp_path: Path,
) -> None:
    """An 8B LoRA recipe at 8192 tokens without checkpointing: eager attention's seq^2 scores
    are 320 GiB of it, sdpa's estimate has none, and the advice names the sequence length
    (with what it saves) because activations dominate."""
    from launcher.config.plan import ClusterFacts, resolve
    from launcher.config.recipe import load_recipe

    recipe_file = Path(__file__).resolve().parents[2] / "recipes" / "llama8b_lora.yaml"
    sets = ["data.max_seq_len=8192", "train.gradient_checkpointing=false"]
    facts = ClusterFacts(run_dir=str(tmp_path / "run"))
    sdpa = resolve(load_recipe(recipe_file, sets), facts)
    eager = resolve(load_recipe(recipe_file, [*sets, "model.attn_implementation=eager"]), facts)
    assert sdpa.memory is not None and eager.memory is not None
    s, b, a, layers = 8192, 2, 32, 32
    gap = eager.memory["per_gpu_gib"] - sdpa.memory["per_gpu_gib"]
    assert gap == pytest.approx(layers * 5 * a * s * s * b / GIB, abs=1e-2)
    warning = next(w for w in sdpa.warnings if "exceeds" in w)
    assert "data.max_seq_len (8192 now" in warning and "saves" in warning
    assert "model.attn_implementation=sdpa" in next(w for w in eager.warnings if "exceeds" in w)


def test_fsdp_cpu_offload_moves_weights_grads_and_optimizer_to_the_host() -> None:
    full = replace(LLAMA8B_LORA, method="full", strategy="fsdp", gradient_checkpointing=True)
    on_gpu = estimate(full)
    offload = estimate(replace(full, offload_params=True))
    parts = offload["breakdown_gib"]
    assert parts["weights"] == parts["gradients"] == parts["optimizer"] == 0.0
    assert parts["activations"] == on_gpu["breakdown_gib"]["activations"]
    moved = sum(on_gpu["breakdown_gib"][k] for k in ("weights", "gradients", "optimizer")) * 8
    extra_host = offload["host_ram_load_gib_per_node"] - on_gpu["host_ram_load_gib_per_node"]
    assert extra_host == pytest.approx(moved, rel=1e-3)  # each rank's shard, 8 ranks a node
