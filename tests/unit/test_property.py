"""Random YAML and random --set overrides: only a clean RecipeError or a valid plan."""

from __future__ import annotations

import contextlib
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.config.plan import ClusterFacts, resolve
from launcher.config.recipe import load_recipe
from launcher.errors import RecipeError

ROOT = Path(__file__).resolve().parents[2]
KEYS = [
    "name",
    "model",
    "method",
    "data",
    "train",
    "distributed",
    "resources",
    "serve",
    "eval",
    "merge",
    "name_or_path",
    "kind",
    "r",
    "learning_rate",
    "strategy",
    "nodes",
    "gpus_per_node",
    "micro_batch_size",
    "global_batch_size",
    "train",
    "format",
    "bogus",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(["lora", "qlora", "full", "zero3", "bf16", "tiny:llama", "alpaca"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)
    ),
    max_leaves=12,
)


def _outcome(path: Path, overrides: list[str]) -> None:
    try:
        recipe = load_recipe(path, overrides)
        resolve(recipe, ClusterFacts(run_dir="/tmp/x"))
    except RecipeError as exc:
        assert exc.problems
        assert all(p.message for p in exc.problems)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(doc=st.dictionaries(st.sampled_from(KEYS), values, max_size=6))
def test_random_yaml_gives_clean_error_or_plan(doc: dict, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("h") / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    _outcome(path, [])


@settings(max_examples=150, deadline=None)
@given(
    keys=st.lists(
        st.sampled_from(
            [
                "train.learning_rate",
                "method.r",
                "resources.nodes",
                "train.micro_batch_size",
                "distributed.strategy",
                "method.kind",
                "model",
                "train",
                "a.b.c",
                "train.bogus",
                "method.quant.quant_storage",
                "data.max_seq_len",
                "",
                "=",
            ]
        ),
        max_size=4,
    ),
    vals=st.lists(st.text(max_size=10), min_size=4, max_size=4),
)
def test_random_overrides_give_clean_error_or_plan(keys: list[str], vals: list[str]) -> None:
    _outcome(
        ROOT / "recipes/quickstart.yaml", [f"{k}={v}" for k, v in zip(keys, vals, strict=False)]
    )


def test_random_text_is_a_clean_error(tmp_path: Path) -> None:
    for text in ["{", "a: [", "\x00\x01", "- - -", "key: !!binary xx", "? [a]\n: b"]:
        path = tmp_path / "r.yaml"
        path.write_text(text)
        with contextlib.suppress(RecipeError):
            load_recipe(path)
