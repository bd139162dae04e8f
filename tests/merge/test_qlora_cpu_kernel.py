"""QLoRA's 4-bit base on either bitsandbytes CPU path.

bitsandbytes reads the CPU at construction (`Linear4bit.support_avx512bf16_for_cpu`): with
AVX512-BF16 an eval forward repacks the weight for its inference kernel, on AVX2 it does not.
Both paths are forced here, whichever CPU runs the test, through the layer that the rank
builds (launcher/train/model.py keep_training_layout)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from launcher.train.model import keep_training_layout


def load_4bit_bf16_storage(base: Path) -> Any:
    """NF4 with double quantization and bf16 storage (what ZeRO-3 needs), fp32 compute."""
    import transformers

    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=torch.bfloat16,
    )
    return transformers.AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, quantization_config=config
    )


@pytest.mark.parametrize("avx512bf16", [True, False], ids=["avx512bf16-path", "avx2-path"])
def test_eval_then_checkpoint_keeps_training_layout(
    avx512bf16: bool, bases: Any, tmp_path: Path
) -> None:
    """An eval without grad, then a checkpoint, as a QLoRA run does: eval computes the logits
    training computes, the weights keep their bf16 storage, and the checkpoint saves and loads
    back to the same model."""
    import bitsandbytes as bnb
    import transformers

    base = bases("llama")
    model = load_4bit_bf16_storage(base)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = avx512bf16
    assert keep_training_layout(model) == len(layers) > 0

    ids = transformers.AutoTokenizer.from_pretrained(base)(
        "the movie was good", return_tensors="pt"
    )
    model.train()
    with torch.no_grad():
        trained = model(**ids).logits
    model.eval()
    with torch.no_grad():
        evaluated = model(**ids).logits
    torch.testing.assert_close(evaluated, trained, rtol=0, atol=0)
    assert all(layer.weight.dtype == torch.bfloat16 for layer in layers)

    model.save_pretrained(tmp_path / "checkpoint")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint")
    keep_training_layout(again)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(**ids).logits, trained, rtol=0, atol=0)
