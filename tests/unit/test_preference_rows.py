"""Preference rows in the Argilla / UltraFeedback shape: `chosen` and `rejected` are whole
conversations that repeat the prompt. DPO must see the prompt once: the repeat is stripped
when it really is the prompt, and a row whose conversations start elsewhere is refused with
its line number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.config.schema import Recipe
from launcher.data.rows import load_splits
from launcher.errors import RecipeError

Q = "Which planet is largest?"


def convo(answer: str, question: str = Q) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def recipe(path: Path) -> Recipe:
    return Recipe.model_validate(
        {
            "name": "p",
            "model": {"name_or_path": "tiny:llama"},
            "data": {"train": str(path), "format": "preference"},
        }
    )


def write(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_conversations_that_repeat_the_prompt_train_it_once(tmp_path: Path) -> None:
    rows = [
        {"prompt": Q, "chosen": convo("Jupiter"), "rejected": convo("Mars")},  # UltraFeedback
        {"prompt": [{"role": "user", "content": Q}], "chosen": "Jupiter", "rejected": "Mars"},
    ]
    split = load_splits(recipe(write(tmp_path / "p.jsonl", rows)))
    expected = {
        "prompt": [{"role": "user", "content": Q}],
        "chosen": [{"role": "assistant", "content": "Jupiter"}],
        "rejected": [{"role": "assistant", "content": "Mars"}],
    }
    assert split.train == [expected, expected]


def test_conversations_that_do_not_repeat_the_prompt_are_refused_by_line(tmp_path: Path) -> None:
    rows = [
        {"prompt": Q, "chosen": convo("Jupiter"), "rejected": convo("Mars")},
        {"prompt": Q, "chosen": convo("Jupiter", "Another question?"), "rejected": "Mars"},
        {"prompt": Q, "chosen": "Jupiter", "rejected": [{"role": "user", "content": Q}] * 2},
        {"prompt": Q, "chosen": convo("Jupiter"), "rejected": convo("Jupiter")},
    ]
    with pytest.raises(RecipeError) as caught:
        load_splits(recipe(write(tmp_path / "p.jsonl", rows)))
    text = caught.value.render()
    assert "p.jsonl:2" in text and "'chosen' starts with a user turn that is not a repeat" in text
    assert "p.jsonl:3" in text and "'rejected'" in text
    assert "p.jsonl:4" in text and "'chosen' equals 'rejected'" in text
    assert "p.jsonl:1" not in text


def test_llamafactory_pairs_give_each_answer_as_one_sharegpt_message(tmp_path: Path) -> None:
    """LLaMA-Factory's dpo_en_demo: the prompt as ShareGPT `conversations`, `chosen` and
    `rejected` as one {from, value} object each (axolotl's chat_template DPO rows too)."""
    rows = [
        {
            "conversations": [{"from": "human", "value": Q}],
            "chosen": {"from": "gpt", "value": "Jupiter"},
            "rejected": {"from": "gpt", "value": "Mars"},
        },
        {"conversations": [{"from": "human", "value": Q}], "chosen": {"from": "gpt"},
         "rejected": {"from": "gpt", "value": "Mars"}},
    ]  # fmt: skip
    shape = {
        "columns": {"conversations": "prompt"},
        "role_key": "from",
        "content_key": "value",
        "roles": {"human": "user", "gpt": "assistant"},
    }
    path = write(tmp_path / "p.jsonl", rows[:1])
    base = recipe(path)
    sharegpt = base.model_copy(update={"data": base.data.model_copy(update=shape)})
    split = load_splits(sharegpt)
    assert split.train == [
        {
            "prompt": [{"role": "user", "content": Q}],
            "chosen": [{"role": "assistant", "content": "Jupiter"}],
            "rejected": [{"role": "assistant", "content": "Mars"}],
        }
    ]
    broken = sharegpt.model_copy(
        update={"data": sharegpt.data.model_copy(update={"train": str(write(path, rows))})}
    )
    with pytest.raises(RecipeError) as caught:
        load_splits(broken)
    assert "p.jsonl:2" in caught.value.render() and "chosen[0]" in caught.value.render()


def test_a_system_column_becomes_the_system_turn_of_the_prompt(tmp_path: Path) -> None:
    """argilla/distilabel-intel-orca-dpo-pairs has system, input, chosen, rejected columns;
    axolotl's bradley_terry.chat_template puts a non-empty system first, then input as the
    user turn. Read so by default (the column was ignored before: the pairs trained without
    their system prompt)."""
    rows = [
        {"system": "Answer briefly.", "input": Q, "chosen": "Jupiter", "rejected": "Mars"},
        {"system": "", "input": Q, "chosen": "Jupiter", "rejected": "Mars"},
        {"system": 3, "input": Q, "chosen": "Jupiter", "rejected": "Mars"},
        {"system": "Hi", "input": [{"role": "system", "content": "S"}, {"role": "user", "content": Q}],
         "chosen": "Jupiter", "rejected": "Mars"},
    ]  # fmt: skip
    path = write(tmp_path / "p.jsonl", rows)
    base = recipe(path).model_dump()
    base["data"] |= {"format": "reward", "columns": {"input": "prompt"}, "invalid_rows": "drop"}
    base["model"] |= {"task": "sequence_classification", "num_labels": 1}
    split = load_splits(Recipe.model_validate(base))
    assert [row["prompt"] for row in split.train] == [
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": Q}],
        [{"role": "user", "content": Q}],
    ]
    problems = [p.problem for report in split.reports for p in report.problems]
    assert problems == [
        "'system' must be a string (got int)",
        "a 'system' column and a system turn in 'prompt': give the system prompt once",
    ]


def test_kto_rows_given_as_one_conversation_split_at_the_last_turn(tmp_path: Path) -> None:
    """LLaMA-Factory's kto_en_demo: `messages` (user, then the judged assistant turn) and a
    bool `label`, no prompt/completion columns."""
    rows = [
        {"messages": convo("Jupiter"), "label": True},
        {"messages": [{"role": "user", "content": Q}], "label": False},
    ]
    path = write(tmp_path / "k.jsonl", rows[:1])
    base = recipe(path)
    kto = base.model_copy(update={"data": base.data.model_copy(update={"format": "kto"})})
    assert load_splits(kto).train == [
        {
            "prompt": [{"role": "user", "content": Q}],
            "completion": [{"role": "assistant", "content": "Jupiter"}],
            "label": True,
        }
    ]
    broken = kto.model_copy(
        update={"data": kto.data.model_copy(update={"train": str(write(path, rows))})}
    )
    with pytest.raises(RecipeError) as caught:
        load_splits(broken)
    assert "k.jsonl:2" in caught.value.render() and "'messages'" in caught.value.render()
