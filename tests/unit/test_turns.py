"""Chat rows train every assistant turn (launcher/data/turns.py): the loss mask the rank builds
covers each assistant answer and its end-of-turn, never a user or system turn; the tokens are
the chat template's, the one vLLM serves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from launcher.config.schema import DataConfig
from launcher.data.formats import get_format
from launcher.data.rows import check_source, length_fn, tokenized_turns
from launcher.data.turns import TurnError, tokenize_turns

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "is the food good?"},
    {"role": "assistant", "content": "positive"},
    {"role": "user", "content": "thanks"},
    {"role": "assistant", "content": "goodbye"},
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from launcher.tiny import build_tokenizer

    return build_tokenizer(["is the food good? positive thanks goodbye be brief"], 400)


def trained_text(tokenizer: Any, tokens: dict[str, list[int]]) -> str:
    ids = [t for t, m in zip(tokens["input_ids"], tokens["completion_mask"], strict=True) if m]
    return str(tokenizer.decode(ids))


def test_every_assistant_turn_is_trained_and_nothing_else(tokenizer: Any) -> None:
    tokens = tokenize_turns(tokenizer, CHAT)
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert tokenizer.decode(tokens["input_ids"]) == rendered  # the template's own tokens
    assert trained_text(tokenizer, tokens) == "positive<|end|>\ngoodbye<|end|>\n"


def test_last_only_trains_the_last_turn(tokenizer: Any) -> None:
    tokens = tokenize_turns(tokenizer, CHAT, last_only=True)
    assert trained_text(tokenizer, tokens) == "goodbye<|end|>\n"


def test_a_messages_row_reaches_the_rank_with_its_first_answer_trained(tokenizer: Any) -> None:
    data = DataConfig(train="x.jsonl", format="messages")
    row = get_format("messages").convert({"messages": CHAT}, data, None)
    # evaluation still reads the last turn as the answer ...
    assert row["completion"] == [CHAT[-1]]
    # ... while the rank trains both answers
    assert "positive" in trained_text(tokenizer, tokenized_turns(tokenizer, data)(row))
    last = DataConfig(train="x.jsonl", format="messages", assistant_turns="last")
    assert "positive" not in trained_text(tokenizer, tokenized_turns(tokenizer, last)(row))


def test_a_template_that_drops_earlier_answers_is_a_row_problem(
    tokenizer: Any, tmp_path: Path
) -> None:

    # a template that renders only the last assistant turn (as reasoning templates drop
    # earlier thoughts): the first answer has no tokens to train, and the row says so
    dropping = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    saved, tokenizer.chat_template = tokenizer.chat_template, dropping
    try:
        with pytest.raises(TurnError, match="assistant turn 2"):
            tokenize_turns(tokenizer, CHAT)
        path = tmp_path / "chats.jsonl"
        path.write_text(json.dumps({"messages": CHAT}) + "\n")
        data = DataConfig(train=str(path), format="messages")
        _, report, _ = check_source(
            str(path), data, num_labels=None, measure=length_fn(tokenizer, data)
        )
        assert [(p.row, "assistant turn 2" in p.problem) for p in report.problems] == [(1, True)]
    finally:
        tokenizer.chat_template = saved
