"""data.alpaca_prompt: the prompt text each peer builds from an alpaca row, reproduced exactly
(axolotl's `alpaca` prompter, torchtune's AlpacaToMessages, oumi's alpaca datasets,
LLaMA-Factory's alpaca converter), through the row conversion training and evaluation share."""

from __future__ import annotations

from typing import Any

import pytest

from launcher.config.schema import Recipe
from launcher.data.formats import get_format
from launcher.data.rows import prepare_tokenizer
from launcher.data.turns import tokenize_turns

ROW = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
NO_INPUT = {"instruction": "Name a colour.", "input": "", "output": "red"}
WITH = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request."
)
WITHOUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


def recipe(**data: Any) -> Recipe:
    return Recipe.model_validate(
        {
            "name": "t",
            "model": {"name_or_path": "tiny:llama"},
            "data": {"train": "x.jsonl", "format": "alpaca", **data},
        }
    )


def convert(row: dict[str, str], style: str) -> dict[str, Any]:
    data = recipe(alpaca_prompt=style).data
    return get_format("alpaca").convert(row, data, None)


def test_the_default_joins_instruction_and_input_with_a_blank_line() -> None:
    assert recipe().data.alpaca_prompt == "joined"
    assert convert(ROW, "joined")["prompt"] == [
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"}
    ]


def test_llamafactory_joins_with_one_newline() -> None:
    # LLaMA-Factory's AlpacaDatasetConverter: "\n".join([instruction, input])
    assert convert(ROW, "joined_newline")["prompt"][0]["content"] == "Add the numbers.\n2 and 3"
    assert convert(NO_INPUT, "joined_newline")["prompt"][0]["content"] == "Name a colour."


def test_oumi_puts_the_preamble_in_a_system_turn_and_the_input_under_its_heading() -> None:
    assert convert(ROW, "stanford_system")["prompt"] == [
        {"role": "system", "content": WITH},
        {"role": "user", "content": "Add the numbers.\n\n### Input:\n2 and 3"},
    ]
    assert convert(NO_INPUT, "stanford_system")["prompt"][0]["content"] == WITHOUT


def test_torchtune_puts_the_whole_stanford_prompt_in_the_user_turn() -> None:
    assert convert(ROW, "stanford_user")["prompt"] == [
        {
            "role": "user",
            "content": f"{WITH}\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3"
            "\n\n### Response:\n",
        }
    ]
    text = convert(NO_INPUT, "stanford_user")["prompt"][0]["content"]
    assert text == f"{WITHOUT}\n\n### Instruction:\nName a colour.\n\n### Response:\n"


@pytest.mark.parametrize(("row", "preamble"), [(ROW, WITH), (NO_INPUT, WITHOUT)])
def test_axolotl_alpaca_text_is_what_the_rank_trains(row: dict[str, str], preamble: str) -> None:
    """stanford_system under chat_template alpaca: axolotl's AlpacaPrompter (instruct style)
    text, BOS first, EOS last, and only the answer and its EOS trained."""
    from launcher.tiny import build_tokenizer

    tok = build_tokenizer(["Add the numbers. 2 and 3 5 Name a colour. red"], 400)
    prepare_tokenizer(tok, recipe(chat_template="alpaca"))
    converted = convert(row, "stanford_system")
    messages = converted["prompt"] + converted["completion"]
    turn = (
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
        if row["input"]
        else "### Instruction:\nName a colour.\n\n### Response:\n"
    )
    expected = f"<s>{preamble}\n\n{turn}{row['output']}<|end|>"
    assert tok.apply_chat_template(messages, tokenize=False) == expected
    tokens = tokenize_turns(tok, messages)
    trained = [t for t, m in zip(*tokens.values(), strict=True) if m]
    assert tok.decode(trained) == f"{row['output']}<|end|>"


def test_an_unknown_style_is_a_recipe_error_naming_the_field() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        recipe(alpaca_prompt="vicuna")
    assert "alpaca_prompt" in str(caught.value)
