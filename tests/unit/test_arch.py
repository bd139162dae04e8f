"""The planner's closed-form parameter counts equal the real transformers models (meta device)."""

from __future__ import annotations

import pytest

from launcher.config.arch import BUILTIN, TINY, ModelShape


def _real_counts(shape: ModelShape, r: int) -> tuple[int, int]:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from launcher.tiny import decoder_config

    config = decoder_config(shape)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=r, target_modules="all-linear"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return total, trainable


@pytest.mark.parametrize("key", [*BUILTIN, "llama", "qwen2"])
def test_counts_equal_real_model(key: str) -> None:
    shape = BUILTIN.get(key) or TINY[key]
    total, trainable = _real_counts(shape, r=8)
    assert shape.total_params() == total
    assert shape.lora_params(8, "all-linear") == trainable
