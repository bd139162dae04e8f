"""`tune-launch tiny ARCH DIR` writes a model that loads offline and runs a forward pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.cli import main


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_tiny_causal_lm_loads_and_generates(arch: str, tmp_path: Path) -> None:
    import torch
    import transformers

    assert main(["tiny", arch, str(tmp_path)]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "hello world"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape[-1] == model.config.vocab_size
    assert torch.isfinite(logits).all()
    assert tok.eos_token == "<|end|>"
    assert tok.convert_tokens_to_ids("<|end|>") in model.generation_config.eos_token_id


def test_tiny_distilbert_classifies(tmp_path: Path) -> None:
    import torch
    import transformers

    assert main(["tiny", "distilbert", str(tmp_path)]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, local_files_only=True
    )
    with torch.no_grad():
        out = model(**tok(["a good movie", "bad"], padding=True, return_tensors="pt"))
    assert out.logits.shape == (2, 2)


def test_unknown_arch_is_usage_error(tmp_path: Path) -> None:
    assert main(["tiny", "gpt5", str(tmp_path)]) == 2
