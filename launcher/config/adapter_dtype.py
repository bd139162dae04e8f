"""method.adapter_dtype: the dtype the adapter's trainable weights train in, decided once.

Left alone, the libraries decide it differently by case, without a word: peft upcasts LoRA
and IA3 weights to fp32 over a 16-bit base (`autocast_adapter_dtype`); TRL 1.16 turns that
off under ZeRO-3 (DeepSpeed gathers persistent parameters in the first one's dtype, so a
bf16 base with fp32 adapters fails on the first step, TRL#6089) and casts QLoRA's adapters
to bf16 after wrapping (the QLoRA paper's choice). `auto` names exactly those outcomes in
the plan; fp32 or bf16 are what the recipe says, and the rank casts to them after the
trainer is built (launcher/train/model.py cast_adapters), torchtune's bf16 adapters included.
Under `auto` DoRA's magnitude vector stays fp32, as TRL leaves it (its updates can fall below
bf16's resolution, TRL#7268); a dtype the recipe names applies to every trainable weight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from launcher.config.strategies import get_strategy
from launcher.errors import Problem

if TYPE_CHECKING:
    from launcher.config.recipe import Recipe
    from launcher.config.rules import Candidate

SIXTEEN_BIT = ("bf16", "fp16")


def resolve_adapter_dtype(recipe: Recipe) -> str | None:
    """fp32, bf16 or fp16 for methods that adapt weights (lora, qlora, ia3); None otherwise."""
    method = recipe.method
    if method.kind not in ("lora", "qlora", "ia3"):
        return None
    if method.adapter_dtype != "auto":
        return method.adapter_dtype
    if method.kind == "qlora":
        return "bf16"  # TRL casts a quantized model's adapters to bf16
    zero3 = get_strategy(recipe.distributed.strategy).zero_stage == 3
    if zero3 and recipe.model.dtype in SIXTEEN_BIT:
        return recipe.model.dtype  # TRL: autocast off under ZeRO-3, the base model's dtype
    return "fp32"  # peft's autocast_adapter_dtype


def adapter_dtype_is_possible(c: Candidate) -> list[Problem]:
    """An adapter dtype only where there is an adapter on weights, and under ZeRO-3 (not
    quantized) only the base model's dtype: DeepSpeed cannot gather mixed dtypes."""
    recipe = c.recipe
    chosen = recipe.method.adapter_dtype
    if chosen == "auto":
        return []
    kind = recipe.method.kind
    if kind not in ("lora", "qlora", "ia3"):
        return [
            Problem(
                "method.adapter_dtype",
                f"method.kind={kind} has no adapter on weights "
                f"({'full fine-tuning trains model.dtype' if kind == 'full' else 'virtual tokens'})",
                "remove method.adapter_dtype (or leave it auto)",
                chosen,
            )
        ]
    if get_strategy(recipe.distributed.strategy).zero_stage == 3 and kind != "qlora":
        base = recipe.model.dtype
        if chosen != base:
            return [
                Problem(
                    "method.adapter_dtype",
                    f"under ZeRO-3 DeepSpeed gathers the adapter with the base weights in one "
                    f"dtype; {chosen} adapters on a {base} base fail on the first step "
                    "(TRL#6089)",
                    f"use method.adapter_dtype={base} (or auto), or distributed.strategy=zero2",
                    chosen,
                )
            ]
    return []
