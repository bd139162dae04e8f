"""The rank's one-pass preparation (launcher/data/prepare.py) gives what the row-by-row path
gives: rows.load_splits (read, validate, convert, split, mix), each chat row tokenized by
turns.tokenize_turns (its labels built as TRL SFTTrainer builds them from `completion_mask`
under completion-only loss), then Dataset.from_list. The same trainer rows in the same order
with the same Arrow types, the same data report, the same errors with the same line numbers,
for every format in the registry; and TRL's preparation of both gives the same rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from launcher.config.schema import Recipe
from launcher.data import rows
from launcher.data.chat_tokens import tokenize_conversations
from launcher.data.examine import with_labels
from launcher.data.formats import FORMATS, Example, get_format
from launcher.data.prepare import prepare_splits, split_indices
from launcher.data.turns import TurnError, tokenize_turns
from launcher.errors import RecipeError

WORDS = [
    "the",
    "food",
    "was",
    "good",
    "bad",
    "great",
    "awful",
    "movie",
    "film",
    "book",
    "service",
    "review",
    "plot",
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from launcher.tiny import build_tokenizer

    return build_tokenizer([" ".join(WORDS) + " positive negative"], 400)


def examples(n: int) -> list[Example]:
    out = []
    for i in range(n):
        words = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(1 + i % 9))
        good = i % 3 != 0
        label = "positive" if good else "negative"
        out.append(Example(f"review {i % 5}?", words, label, "negative" if good else "positive"))
    return out


def corpus(path: Path, fmt: str, n: int = 60) -> Path:
    """n rows of `fmt`, some repeated, and rows no format accepts: a blank line, malformed
    JSON, a list, an empty object, and one with every field empty."""
    spec = get_format(fmt)
    data = Recipe.model_validate(
        {"name": "x", "model": {"name_or_path": "tiny:llama"}, "data": {"train": "a.jsonl"}}
    ).data
    lines = [json.dumps(spec.example(e, data)) for e in examples(n)]
    lines[10] = lines[3]  # a duplicate
    lines[20:20] = [
        "",
        "{not json",
        "[1, 2]",
        "{}",
        json.dumps({k: "" for k in json.loads(lines[0])}),
    ]
    if fmt == "classification":
        lines.append(json.dumps({"text": "x", "label": 7}))
    path.write_text("\n".join(lines) + "\n")
    return path


def recipe(path: Path | list[dict[str, Any]], fmt: str, **data: Any) -> Recipe:
    return Recipe.model_validate(
        {
            "name": "x",
            "model": {"name_or_path": "tiny:llama", "num_labels": 3},
            "data": {"train": path, "format": fmt, "invalid_rows": "drop", **data},
        }
    )


def trl_labels(row: dict[str, Any]) -> dict[str, Any]:
    """TRL SFTTrainer's "Building labels" of one row under completion_only_loss (its
    `build_labels` with mask_columns ["completion_mask"], the mask column then removed)."""
    ids, mask = row["input_ids"], row["completion_mask"]
    return {"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask, strict=False)]}


def old_path(recipe: Recipe, tokenizer: Any) -> tuple[Any, Any, list[dict[str, Any]], Any]:
    """What the rank built before prepare.py: load_splits, tokenize_turns per row (with TRL's
    labels where TRL builds them), from_list."""
    import datasets

    splits = rows.load_splits(recipe, rows.length_fn(tokenizer, recipe.data))
    train, validation = splits.train, splits.validation
    if get_format(recipe.data.format).turns:
        tokenize = rows.tokenized_turns(tokenizer, recipe.data)
        train, validation = [tokenize(r) for r in train], [tokenize(r) for r in validation]
        if with_labels(recipe.data):
            train, validation = [trl_labels(r) for r in train], [trl_labels(r) for r in validation]

    def arrow(split: list[dict[str, Any]]) -> Any:
        return datasets.Dataset.from_list(split) if split else None

    reports = [r.to_dict() | {"summary": r.summary()} for r in splits.reports]
    return arrow(train), arrow(validation), reports, splits.labels


def assert_same(recipe: Recipe, tokenizer: Any, out: Path) -> Any:
    train, validation, reports, labels = old_path(recipe, tokenizer)
    new = prepare_splits(recipe, tokenizer, out)
    assert [r.to_dict() | {"summary": r.summary()} for r in new.reports] == reports
    assert new.labels == labels
    for old, fresh in ((train, new.train), (validation, new.validation)):
        assert (old is None) == (fresh is None)
        if old is not None:
            assert fresh.features == old.features
            assert fresh.to_list() == old.to_list()
    return new


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_gives_the_rows_and_report_of_the_row_by_row_path(
    tmp_path: Path, tokenizer: Any, fmt: str
) -> None:
    path = corpus(tmp_path / "a.jsonl", fmt)
    new = assert_same(
        recipe(str(path), fmt, val_split=0.2, seed=3, max_seq_len=24), tokenizer, tmp_path / "c"
    )
    report = new.reports[0]
    assert report.problems and report.duplicates >= 1
    assert {22, 23, 24, 25} <= {p.row for p in report.problems}  # lines of the file


def test_weighted_sources_max_samples_and_a_validation_file(tmp_path: Path, tokenizer: Any) -> None:
    a = corpus(tmp_path / "a.jsonl", "alpaca", 50)
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps({"q": f"b{i}", "a": "yes"}) + "\n" for i in range(15)))
    v = corpus(tmp_path / "v.jsonl", "alpaca", 12)
    train = [
        {"path": str(a), "weight": 2, "max_samples": 30},
        {"path": str(b), "weight": 1, "columns": {"q": "instruction", "a": "output"}},
    ]
    assert_same(
        recipe(train, "alpaca", validation=str(v), max_samples=40, seed=5),
        tokenizer,
        tmp_path / "c",
    )


def test_other_file_kinds_and_string_labels(tmp_path: Path, tokenizer: Any) -> None:
    csv = tmp_path / "a.csv"
    csv.write_text(
        "text,label\n" + "".join(f"row {i},{'pos' if i % 2 else 'neg'}\n" for i in range(20))
    )
    assert_same(recipe(str(csv), "classification"), tokenizer, tmp_path / "c")
    listed = tmp_path / "m.json"
    chats = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
        for i in range(10)
    ]
    listed.write_text(json.dumps([*chats, {"messages": []}]))
    assert_same(recipe(str(listed), "messages", assistant_turns="last"), tokenizer, tmp_path / "d")


def test_two_processes_give_the_same_rows(tmp_path: Path, tokenizer: Any) -> None:
    path = corpus(tmp_path / "a.jsonl", "messages", 3000)
    assert_same(recipe(str(path), "messages", num_proc=2, val_split=0.1), tokenizer, tmp_path / "c")


def test_invalid_rows_error_names_the_same_lines(tmp_path: Path, tokenizer: Any) -> None:
    path = corpus(tmp_path / "a.jsonl", "alpaca")
    strict = recipe(str(path), "alpaca", invalid_rows="error")
    with pytest.raises(RecipeError) as old:
        rows.load_splits(strict, rows.length_fn(tokenizer, strict.data))
    with pytest.raises(RecipeError) as new:
        prepare_splits(strict, tokenizer, tmp_path / "c")
    assert new.value.render() == old.value.render()
    assert "a.jsonl:22" in new.value.render()


def test_an_empty_file_is_the_same_error(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "e.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(RecipeError) as old:
        rows.load_splits(recipe(str(path), "alpaca"))
    with pytest.raises(RecipeError) as new:
        prepare_splits(recipe(str(path), "alpaca"), tokenizer, tmp_path / "c")
    assert new.value.render() == old.value.render()


def test_batched_turns_equal_tokenize_turns_and_its_error(tokenizer: Any) -> None:
    chat = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "good food?"},
        {"role": "assistant", "content": "positive"},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "bad"},
    ]
    for last_only in (False, True):
        batch = tokenize_conversations(tokenizer, [chat, chat[:3]], last_only=last_only)
        assert batch == [
            tokenize_turns(tokenizer, c, last_only=last_only) for c in (chat, chat[:3])
        ]


def test_a_turn_without_tokens_is_a_turn_error(tokenizer: Any) -> None:
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    chat = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    with pytest.raises(TurnError) as old:
        tokenize_turns(tok, chat)
    [new] = tokenize_conversations(tok, [chat], last_only=False)
    assert isinstance(new, TurnError) and str(new) == str(old.value)


@pytest.mark.parametrize(
    "count,val_split,seed", [(1, 0.5, 1), (2, 0.5, 1), (97, 0.1, 3), (500, 0.3, 9)]
)
def test_split_indices_hold_out_the_rows_split_rows_does(
    count: int, val_split: float, seed: int
) -> None:
    positions = list(range(count))
    train, held = rows.split_rows([{"i": i} for i in positions], val_split, seed)
    kept, out = split_indices(count, val_split, seed)
    assert [r["i"] for r in train] == kept.tolist()
    assert [r["i"] for r in held] == out.tolist()


def test_chat_rows_keep_the_mask_without_completion_only_loss(
    tmp_path: Path, tokenizer: Any
) -> None:
    path = corpus(tmp_path / "a.jsonl", "messages")
    whole = recipe(str(path), "messages", completion_only_loss=False)
    new = assert_same(whole, tokenizer, tmp_path / "c")
    assert new.train.column_names == ["input_ids", "completion_mask"]


@pytest.mark.parametrize("completion_only", [True, False])
def test_labels_in_the_rows_exactly_when_the_trainer_masks_completions(
    tmp_path: Path, completion_only: bool
) -> None:
    """The rows carry TRL's labels only where the rank's SFTConfig has completion_only_loss
    (otherwise TRL would train every token of rows that came with labels)."""
    from types import SimpleNamespace
    from unittest import mock

    from launcher.config.plan import ClusterFacts, resolve
    from launcher.rundir import RunDir
    from launcher.train.args import training_args

    for fmt in ("alpaca", "messages"):
        r = Recipe.model_validate(
            {
                "name": "x",
                "model": {"name_or_path": "tiny:llama", "dtype": "fp32"},
                "data": {
                    "train": "a.jsonl",
                    "format": fmt,
                    "completion_only_loss": completion_only,
                },
                "train": {"precision": "fp32", "max_steps": 1},
                "resources": {"nodes": 1, "gpus_per_node": 1, "accelerator": "cpu"},
            }
        )
        plan = resolve(r, ClusterFacts(run_dir=str(tmp_path / "run"), python=sys.executable))
        with mock.patch("trl.SFTConfig", lambda **kw: SimpleNamespace(**kw)):  # no process group
            args = training_args(plan, RunDir(plan.run_dir), has_eval=False)
        assert with_labels(r.data) is bool(args.completion_only_loss) is completion_only


@pytest.mark.parametrize("packing", [False, True])
def test_trl_prepares_the_same_rows_from_both_paths(
    tmp_path: Path, tokenizer: Any, packing: bool
) -> None:
    """What training receives: TRL SFTTrainer's own preparation (labels, truncation or
    packing) of the reference rows and of prepare.py's rows gives the same dataset."""
    from types import SimpleNamespace

    import datasets
    from trl import SFTConfig, SFTTrainer

    path = corpus(tmp_path / "a.jsonl", "messages", 200)
    r = recipe(str(path), "messages", max_seq_len=20, packing=packing)
    splits = rows.load_splits(r, rows.length_fn(tokenizer, r.data))
    reference = [rows.tokenized_turns(tokenizer, r.data)(row) for row in splits.train]
    new = prepare_splits(r, tokenizer, tmp_path / "c").train
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_length=20,
        packing=packing,
        completion_only_loss=True,
        report_to="none",
        use_cpu=True,
    )
    owner = SimpleNamespace(completion_only_loss=True)

    def prepared(dataset: Any) -> list[dict[str, Any]]:
        done = SFTTrainer._prepare_dataset(owner, dataset, tokenizer, args, packing, None, "x")
        return done.to_list()

    found = prepared(new)
    assert found and found == prepared(datasets.Dataset.from_list(reference))


def test_the_duplicate_key_spells_rows_as_rows_key_does() -> None:
    from launcher.data.examine import _KEY

    for row in (
        {"b": 1, "a": [1.5, None, True], "c": "ünï"},
        {"instruction": "x", "input": "", "output": "y"},
        {"messages": [{"role": "user", "content": "q"}], "when": Path("/x")},
    ):
        assert _KEY.encode(row) == rows._key(row)
