"""Data validation and conversion (fast, no training)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from launcher.config.recipe import Recipe
from launcher.data import rows as data
from launcher.errors import RecipeError

from .conftest import write_jsonl


def recipe(train: Path | str, **data_fields: Any) -> Recipe:
    model: dict[str, Any] = {"name_or_path": "tiny:llama"}
    if data_fields.get("format") == "classification":
        model |= {
            "name_or_path": "tiny:distilbert",
            "task": "sequence_classification",
            "num_labels": 2,
        }
    return Recipe.model_validate(
        {"name": "t", "model": model, "data": {"train": str(train), **data_fields}}
    )


GOOD = {
    "instruction": "Is this review positive or negative?",
    "input": "a fine film",
    "output": "positive",
}


def test_alpaca_rows_become_conversational_prompt_completion(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD, {**GOOD, "input": ""}])
    splits = data.load_splits(recipe(path))
    assert splits.train[0] == {
        "prompt": [
            {"role": "user", "content": "Is this review positive or negative?\n\na fine film"}
        ],
        "completion": [{"role": "assistant", "content": "positive"}],
    }
    assert splits.train[1]["prompt"][0]["content"] == "Is this review positive or negative?"


def test_broken_rows_are_reported_with_their_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    lines = [
        json.dumps(GOOD).encode(),  # 1
        json.dumps({"instruction": "x"}).encode(),  # 2 missing output
        b'{"instruction": "x", "output": ',  # 3 malformed
        json.dumps({**GOOD, "output": "  "}).encode(),  # 4 empty output
        b"",  # 5 blank: ignored
        b'{"instruction": "caf\xe9", "output": "y"}',  # 6 latin-1 byte
        json.dumps([1, 2]).encode(),  # 7 not an object
        json.dumps({**GOOD, "output": 3}).encode(),  # 8 wrong type
        json.dumps(GOOD).encode(),  # 9 duplicate of 1
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(RecipeError) as caught:
        data.validate_data(recipe(path))
    text = caught.value.render()
    for line, problem in [
        (2, "missing field 'output'"),
        (3, "malformed JSON"),
        (4, "empty 'output'"),
        (6, "not valid UTF-8"),
        (7, "expected a JSON object"),
        (8, "field 'output' must be a string (got int)"),
    ]:
        assert f"broken.jsonl:{line}: {problem}" in text, text
    assert "6 invalid row(s) of 8" in text  # blank lines are not rows
    assert "data.invalid_rows=drop" in text

    reports = data.validate_data(recipe(path, invalid_rows="drop"))
    assert (reports[0].read, reports[0].valid, reports[0].duplicates) == (8, 2, 1)
    assert [p.row for p in reports[0].problems] == [2, 3, 4, 6, 7, 8]


def test_missing_and_empty_files_are_recipe_errors(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="data file not found"):
        data.validate_data(recipe(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(RecipeError, match="empty"):
        data.validate_data(recipe(tmp_path / "empty.jsonl"))


def test_formats(tmp_path: Path) -> None:
    messages = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": "hi"}]},  # no assistant turn at the end
        {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "a"}]},
    ]
    reports = data.validate_data(
        recipe(write_jsonl(tmp_path / "m.jsonl", messages), format="messages", invalid_rows="drop")
    )
    assert [p.row for p in reports[0].problems] == [2, 3]
    split = data.load_splits(recipe(tmp_path / "m.jsonl", format="messages", invalid_rows="drop"))
    assert split.train[0]["completion"] == [{"role": "assistant", "content": "yo"}]

    prefs = [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "a", "rejected": "a"},
        {"prompt": "q", "chosen": "a"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", prefs)
    split = data.load_splits(recipe(path, format="preference", invalid_rows="drop"))
    assert split.train == [
        {
            "prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        }
    ]
    assert [p.problem for p in split.reports[0].problems] == [
        "'chosen' equals 'rejected': no preference to learn",
        "missing field 'rejected'",
    ]

    labels = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}, {"text": "x"}]
    path = write_jsonl(tmp_path / "c.jsonl", labels)
    split = data.load_splits(recipe(path, format="classification", invalid_rows="drop"))
    assert split.labels == {"neg": 0, "pos": 1}
    assert split.train == [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]
    ints = write_jsonl(tmp_path / "i.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 5}])
    report = data.validate_data(recipe(ints, format="classification", invalid_rows="drop"))[0]
    assert "outside 0..1" in report.problems[0].problem


def test_csv_and_json_files(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("instruction,input,output\nq,,a\nq2,x,\n")
    report = data.validate_data(recipe(tmp_path / "a.csv", invalid_rows="drop"))[0]
    assert (report.valid, [p.row for p in report.problems]) == (1, [3])
    (tmp_path / "a.json").write_text(json.dumps([GOOD, {"instruction": "x"}]))
    report = data.validate_data(recipe(tmp_path / "a.json", invalid_rows="drop"))[0]
    assert (report.valid, [p.row for p in report.problems]) == (1, [2])


def test_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    rows = [{**GOOD, "input": f"row {i}"} for i in range(50)]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    one = data.load_splits(recipe(path, val_split=0.2, seed=3))
    two = data.load_splits(recipe(path, val_split=0.2, seed=3))
    other = data.load_splits(recipe(path, val_split=0.2, seed=4))
    assert one.train == two.train and one.validation == two.validation
    assert len(one.validation) == 10 and len(one.train) == 40
    assert one.validation != other.validation
    prompts = {json.dumps(r) for r in one.train}
    assert not prompts & {json.dumps(r) for r in one.validation}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from launcher.tiny import build_tokenizer

    return build_tokenizer(["a fine film positive negative"], vocab_size=1024)


def test_token_lengths_flag_overlong_and_prompt_only_rows(tmp_path: Path, tokenizer: Any) -> None:
    long_input = " ".join(["word"] * 200)
    rows = [GOOD, {**GOOD, "output": " ".join(["positive"] * 80)}, {**GOOD, "input": long_input}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    report = data.validate_data(recipe(path, max_seq_len=64, invalid_rows="drop"), tokenizer)[0]
    assert report.measured and report.over_long == 1
    assert [p.row for p in report.problems] == [3]
    assert "no completion token would be trained" in report.problems[0].problem


def test_pad_token_is_never_eos(tokenizer: Any) -> None:
    r = recipe("x.jsonl")
    tokenizer.pad_token = tokenizer.eos_token
    assert data.prepare_tokenizer(tokenizer, r) is False
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    contract = data.train_contract(tokenizer)
    assert contract["eos_token_id"] == tokenizer.eos_token_id
    assert contract["chat_template"] == tokenizer.chat_template

    custom = recipe("x.jsonl", chat_template="{{ messages[0]['content'] }}")
    data.prepare_tokenizer(tokenizer, custom)
    assert tokenizer.chat_template == "{{ messages[0]['content'] }}"


def test_a_chat_format_needs_a_template(tokenizer: Any) -> None:
    tokenizer.chat_template = None
    with pytest.raises(RecipeError, match="no chat template"):
        data.prepare_tokenizer(tokenizer, recipe("x.jsonl"))
    data.prepare_tokenizer(tokenizer, recipe("x.jsonl", format="text"))  # text needs none
