"""The rules of the quantized base (method.kind=qlora, method.quant), run from the one list in
rules.py."""

from __future__ import annotations

from typing import TYPE_CHECKING

from launcher.config.schema import quant_compute_dtype
from launcher.config.strategies import get_strategy
from launcher.errors import Problem

if TYPE_CHECKING:
    from launcher.config.rules import Candidate

# method.quant's settings of a 4-bit base only (an 8-bit base has none of them)
FOUR_BIT_ONLY = ("type", "double_quant", "compute_dtype", "quant_storage")


def qlora_storage_equals_compute_when_sharded(c: Candidate) -> list[Problem]:
    method, strategy = c.recipe.method, c.recipe.distributed.strategy
    if method.kind != "qlora" or not get_strategy(strategy).shards_parameters:
        return []
    compute = quant_compute_dtype(c.recipe)
    if method.quant.quant_storage in (None, compute):
        return []
    return [
        Problem(
            "method.quant.quant_storage",
            f"QLoRA under {strategy} needs the 4-bit storage dtype equal to the compute dtype "
            f"({compute}), or shards of different dtypes cannot be flattened",
            f"remove it (it is then set to {compute}) or set it to {compute}",
            method.quant.quant_storage,
        )
    ]


def quant_settings_need_qlora(c: Candidate) -> list[Problem]:
    method = c.recipe.method
    if method.kind == "qlora" or "quant" not in method.model_fields_set:
        return []
    why = (
        f"4-bit settings with method.kind={method.kind}: a 4-bit base cannot be fully fine-tuned"
        if method.kind == "full"
        else "4-bit settings only apply to qlora"
    )
    return [Problem("method.quant", why, "use method.kind=qlora, or remove method.quant")]


def eight_bit_settings_fit(c: Candidate) -> list[Problem]:
    """method.quant.bits=8 (LLM.int8, bitsandbytes): none of the 4-bit settings, and not
    sharded by ZeRO-3 or FSDP (int8 weights with their row scales cannot be flattened into
    shards; bitsandbytes supports sharding for 4-bit storage only)."""
    method, strategy = c.recipe.method, c.recipe.distributed.strategy
    quant = method.quant
    if method.kind != "qlora" or quant.bits != 8:
        return []
    problems = [
        Problem(
            f"method.quant.{name}",
            "a 4-bit setting; method.quant.bits=8 loads an LLM.int8 base",
            "remove it, or use method.quant.bits=4",
            getattr(quant, name),
        )
        for name in FOUR_BIT_ONLY
        if name in quant.model_fields_set
    ]
    if get_strategy(strategy).shards_parameters:
        problems.append(
            Problem(
                "method.quant.bits",
                f"an 8-bit base cannot be sharded by {strategy} (bitsandbytes shards 4-bit "
                "storage only)",
                "use distributed.strategy=ddp or zero2, or method.quant.bits=4",
                8,
            )
        )
    return problems
