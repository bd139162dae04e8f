"""The planner's closed-form parameter counts equal the real transformers models (meta device)."""

from __future__ import annotations

import pytest

from launcher.arch import BUILTIN, TINY, ModelShape


def _real_counts(shape: ModelShape, r: int) -> tuple[int, int]:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    kind = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
    }[shape.model_type]
    config = kind(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        tie_word_embeddings=shape.tie_word_embeddings,
    )
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
