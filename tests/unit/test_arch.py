"""The planner's closed-form parameter counts equal the real transformers models (meta device)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from launcher.config.arch import BUILTIN, TINY, ModelShape
from launcher.config.memory import estimate
from tests.support.cases import LLAMA8B_LORA


def _real_counts(
    shape: ModelShape, r: int, modules_to_save: list[str] | None = None
) -> tuple[int, int]:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from launcher.tiny import decoder_config

    config = decoder_config(shape)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    lora = LoraConfig(r=r, target_modules="all-linear", modules_to_save=modules_to_save)
    peft_model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return total, trainable


@pytest.mark.parametrize("key", [*BUILTIN, "llama", "qwen2", "qwen3"])
def test_counts_equal_real_model(key: str) -> None:
    shape = BUILTIN.get(key) or TINY[key]
    total, trainable = _real_counts(shape, r=8)
    assert shape.total_params() == total
    assert shape.lora_params(8, "all-linear") == trainable


@pytest.mark.parametrize("saved", [["lm_head"], ["embed_tokens", "lm_head"]])
def test_memory_counts_modules_to_save_as_peft_trains_them(saved: list[str]) -> None:
    shape = TINY["llama"]
    _, trainable = _real_counts(shape, r=8, modules_to_save=saved)
    inputs = replace(LLAMA8B_LORA, shape=shape, lora_r=8, modules_to_save=tuple(saved))
    assert estimate(inputs)["trainable_params"] == trainable
