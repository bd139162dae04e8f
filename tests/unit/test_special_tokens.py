"""data.eos_token, data.pad_token and the named chat templates (chatml, llama3, alpaca), as the
rank's tokenizer receives them (launcher/data/rows.py prepare_tokenizer), and the turns it
then trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from launcher.config.schema import Recipe
from launcher.data.rows import prepare_tokenizer, train_contract
from launcher.data.turns import tokenize_turns
from launcher.errors import RecipeError

CHAT = [{"role": "user", "content": "is it good?"}, {"role": "assistant", "content": "yes"}]


def tokenizer() -> Any:
    from launcher.tiny import build_tokenizer

    return build_tokenizer(["is it good? yes no"], 300)


def recipe(**data: Any) -> Recipe:
    return Recipe.model_validate(
        {
            "name": "t",
            "model": {"name_or_path": "tiny:llama"},
            "data": {"train": "x.jsonl", "format": "messages", **data},
        }
    )


def test_eos_and_pad_overrides() -> None:
    tok = tokenizer()
    assert prepare_tokenizer(tok, recipe(eos_token="</s>", pad_token="<unk>")) is False
    assert tok.eos_token == "</s>" and tok.pad_token == "<unk>"
    contract = train_contract(tok)
    assert contract["eos_token"] == "</s>" and contract["pad_token"] == "<unk>"


def test_a_new_pad_token_is_added_and_the_embeddings_resized() -> None:
    tok = tokenizer()
    assert prepare_tokenizer(tok, recipe(pad_token="<|mypad|>")) is True
    assert tok.pad_token == "<|mypad|>" and tok.pad_token_id is not None


def test_bad_eos_override_names_the_field() -> None:
    with pytest.raises(RecipeError) as caught:
        prepare_tokenizer(tokenizer(), recipe(eos_token="<|nope|>"))
    assert "data.eos_token" in caught.value.render()


def test_pad_equal_to_eos_trains_the_eos_but_is_refused_for_a_classifier() -> None:
    """axolotl's `pad_token: <|end_of_text|>` on a base Llama: padding is masked by the
    attention mask, so the EOS of every example keeps its label."""
    tok = tokenizer()
    prepare_tokenizer(tok, recipe(pad_token="<|end|>"))
    assert tok.pad_token == tok.eos_token == "<|end|>"
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    eos = tok.eos_token_id
    batch = DataCollatorForLanguageModeling(pad_token_id=eos)(
        [{"input_ids": [5, 6, eos]}, {"input_ids": [7, eos]}]
    )
    assert batch["labels"].tolist() == [[5, 6, eos], [7, eos, -100]]
    classifier = Recipe.model_validate(
        {
            "name": "t",
            "model": {"name_or_path": "tiny:llama", "task": "sequence_classification",
                      "num_labels": 2},
            "data": {"train": "x.jsonl", "format": "classification", "pad_token": "<|end|>"},
        }
    )  # fmt: skip
    with pytest.raises(RecipeError) as caught:
        prepare_tokenizer(tokenizer(), classifier)
    assert "data.pad_token" in caught.value.render()


def test_chatml_adds_its_tokens_and_ends_turns_with_im_end() -> None:
    tok = tokenizer()
    assert prepare_tokenizer(tok, recipe(chat_template="chatml")) is True  # tokens added
    assert tok.eos_token == "<|im_end|>"
    tokens = tokenize_turns(tok, CHAT)
    trained = tok.decode([t for t, m in zip(*tokens.values(), strict=True) if m])
    assert trained == "yes<|im_end|>\n"
    assert tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nis it good?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_llama3_and_alpaca_templates() -> None:
    tok = tokenizer()
    prepare_tokenizer(tok, recipe(chat_template="llama3"))
    assert tok.eos_token == "<|eot_id|>"
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n")
    alpaca = tokenizer()
    assert prepare_tokenizer(alpaca, recipe(chat_template="alpaca")) is False
    text = alpaca.apply_chat_template(CHAT, tokenize=False)
    assert text == "<s>### Instruction:\nis it good?\n\n### Response:\nyes<|end|>"


def test_named_template_reaches_the_saved_contract(tmp_path: Path) -> None:
    tok = tokenizer()
    prepare_tokenizer(tok, recipe(chat_template="chatml"))
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.chat_template == tok.chat_template and again.eos_token == "<|im_end|>"
