"""Several training sources in one run (data.train as a list), as the rank receives them:
each source validated with its own column names, capped by its max_samples, mixed by the
sources' weights, the same on every rank and rerun for one data.seed and another mix for
another seed; the data report (RUN_DIR/data_report.json and the rank's log line) says how many
rows of the training mix came from each source. No training: the rows are the outcome."""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from launcher.config.plan import ClusterFacts, Plan, resolve
from launcher.config.recipe import load_recipe, localize
from launcher.data.rows import Splits, load_splits

from .conftest import write_jsonl


def sources(tmp_path: Path) -> Path:
    """a.jsonl: 60 alpaca rows; b.jsonl: 20 question/answer rows (other column names)."""
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"a{i}", "output": "x"} for i in range(60)])
    write_jsonl(tmp_path / "b.jsonl", [{"question": f"b{i}", "answer": "y"} for i in range(20)])
    return tmp_path


def plan_for(tmp_path: Path, train: str, *overrides: str) -> Plan:
    recipe_file = sources(tmp_path) / "recipe.yaml"
    recipe_file.write_text(
        "name: mix\nmodel: {name_or_path: 'tiny:llama', dtype: fp32}\n"
        f"data:\n  train:\n{train}"
        "train: {precision: fp32}\n"
    )
    recipe = localize(load_recipe(recipe_file, list(overrides)), tmp_path)
    return resolve(recipe, ClusterFacts(run_dir=str(tmp_path / "run"), python=sys.executable))


B_COLUMNS = "columns: {question: instruction, answer: output}"
WEIGHTED = f"    - {{path: a.jsonl, weight: 1}}\n    - {{path: b.jsonl, weight: 1, {B_COLUMNS}}}\n"


def origin(row: dict[str, Any]) -> str:
    """Which source a trainer row came from: the first letter of its instruction."""
    return str(row["prompt"][0]["content"][0])


def counts(splits: Splits) -> Counter[str]:
    return Counter(origin(row) for row in splits.train)


def test_weights_give_each_source_its_share_of_the_mix(tmp_path: Path) -> None:
    splits = load_splits(plan_for(tmp_path, WEIGHTED).recipe)
    # 80 rows in all, half from each: a sampled (40 of 60), b repeated (each of 20 twice)
    assert counts(splits) == {"a": 40, "b": 40}
    assert len({row["prompt"][0]["content"] for row in splits.train if origin(row) == "a"}) == 40
    assert Counter(r["prompt"][0]["content"] for r in splits.train if origin(r) == "b") == {
        f"b{i}": 2 for i in range(20)
    }
    assert [(r.source, r.weight, r.used) for r in splits.reports] == [
        ("a.jsonl", 1.0, 40),
        ("b.jsonl", 1.0, 40),
    ]


def test_uneven_weights(tmp_path: Path) -> None:
    train = f"    - {{path: a.jsonl, weight: 1}}\n    - {{path: b.jsonl, weight: 3, {B_COLUMNS}}}\n"
    assert counts(load_splits(plan_for(tmp_path, train).recipe)) == {"a": 20, "b": 60}


def test_without_weights_every_row_is_used_once(tmp_path: Path) -> None:
    train = f"    - {{path: a.jsonl}}\n    - {{path: b.jsonl, max_samples: 5, {B_COLUMNS}}}\n"
    splits = load_splits(plan_for(tmp_path, train).recipe)
    assert counts(splits) == {"a": 60, "b": 5}
    b_rows = sorted(r["prompt"][0]["content"] for r in splits.train if origin(r) == "b")
    assert b_rows == ["b0", "b1", "b2", "b3", "b4"]  # a source's first max_samples rows


def test_the_mix_is_the_same_for_one_seed_and_another_for_another(tmp_path: Path) -> None:
    first = load_splits(plan_for(tmp_path, WEIGHTED).recipe).train
    again = load_splits(plan_for(tmp_path, WEIGHTED).recipe).train
    assert first == again
    other = load_splits(plan_for(tmp_path, WEIGHTED, "data.seed=7").recipe).train
    assert other != first
    assert {r["prompt"][0]["content"] for r in other} != {r["prompt"][0]["content"] for r in first}


def test_validation_split_per_source_and_global_cap(tmp_path: Path) -> None:
    splits = load_splits(plan_for(tmp_path, WEIGHTED, "data.val_split=0.1").recipe)
    held = Counter(origin(row) for row in splits.validation)
    assert held == {"a": 6, "b": 2}  # 10% of each source, never repeated into training
    train_texts = {r["prompt"][0]["content"] for r in splits.train}
    assert not train_texts & {r["prompt"][0]["content"] for r in splits.validation}
    capped = load_splits(plan_for(tmp_path, WEIGHTED, "data.max_samples=30").recipe)
    assert len(capped.train) == 30 and set(counts(capped)) == {"a", "b"}  # a sample of the mix
    assert sum(r.used or 0 for r in capped.reports) == 30


def test_the_single_string_form_is_unchanged(tmp_path: Path) -> None:
    sources(tmp_path)
    single = plan_for(tmp_path, "", f"data.train={tmp_path / 'a.jsonl'}").recipe
    assert single.data.train == str(tmp_path / "a.jsonl")
    texts = [r["prompt"][0]["content"] for r in load_splits(single).train]
    assert texts == [f"a{i}" for i in range(60)]  # one source keeps its order


def test_a_bad_row_names_its_source(tmp_path: Path) -> None:
    from launcher.errors import RecipeError

    plan = plan_for(tmp_path, WEIGHTED)
    with (tmp_path / "b.jsonl").open("a") as f:
        f.write(json.dumps({"question": "no answer"}) + "\n")
    with pytest.raises(RecipeError) as caught:
        load_splits(plan.recipe)
    text = caught.value.render()
    assert "b.jsonl:21" in text and "data.train.1" in text


def test_the_rank_reports_rows_per_source(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from launcher.rundir import RunDir
    from launcher.tiny import build_base
    from launcher.train.data import load_data, load_tokenizer

    plan = plan_for(tmp_path, WEIGHTED)
    run = RunDir(plan.run_dir)
    build_base(plan)
    tokenizer, _ = load_tokenizer(plan)
    with caplog.at_level(logging.INFO, logger="launcher.train"):
        data = load_data(plan, run, tokenizer, main=True)
    assert len(data.train) == 80
    report = json.loads(run.data_report_file.read_text())
    assert [(r["source"], r["role"], r["used"], r["weight"]) for r in report] == [
        ("a.jsonl", "train", 40, 1.0),
        ("b.jsonl", "train", 40, 1.0),
    ]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data ")]
    assert any("b.jsonl" in line and "40 in the training mix, weight 1" in line for line in lines)
