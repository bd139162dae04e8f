"""Rows in other shapes reach the trainer as the format's own: ShareGPT conversations
(from/value, human/gpt) and renamed columns (data.columns, data.role_key, data.content_key,
data.roles)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from launcher.config.schema import Recipe
from launcher.data.rows import load_splits
from launcher.errors import RecipeError

SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "is it good?"},
        {"from": "gpt", "value": "yes"},
    ]
}
SHAREGPT_DATA = {
    "columns": {"conversations": "messages"},
    "role_key": "from",
    "content_key": "value",
    "roles": {"human": "user", "gpt": "assistant"},
}


def recipe(path: Path, **data: Any) -> Recipe:
    return Recipe.model_validate(
        {"name": "m", "model": {"name_or_path": "tiny:llama"}, "data": {"train": str(path), **data}}
    )


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sharegpt_rows_become_chat_rows(tmp_path: Path) -> None:
    path = write(tmp_path / "s.jsonl", [SHAREGPT])
    split = load_splits(recipe(path, format="messages", **SHAREGPT_DATA))
    assert split.train == [
        {
            "prompt": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "is it good?"},
            ],
            "completion": [{"role": "assistant", "content": "yes"}],
        }
    ]


def test_an_unmapped_role_is_a_numbered_row_problem(tmp_path: Path) -> None:
    path = write(tmp_path / "s.jsonl", [SHAREGPT, SHAREGPT])
    fields = {**SHAREGPT_DATA, "roles": {"human": "user"}}  # gpt left unmapped
    with pytest.raises(RecipeError) as caught:
        load_splits(recipe(path, format="messages", **fields))
    text = caught.value.render()
    assert "s.jsonl:1" in text and "s.jsonl:2" in text and "'gpt'" in text


def test_renamed_alpaca_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", [{"question": "2+2?", "answer": "4"}])
    split = load_splits(recipe(path, columns={"question": "instruction", "answer": "output"}))
    assert split.train[0]["prompt"] == [{"role": "user", "content": "2+2?"}]
    assert split.train[0]["completion"] == [{"role": "assistant", "content": "4"}]
