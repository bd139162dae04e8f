"""More property tests (hypothesis) over the recipe loader and `--set`, through the CLI's own
entry point `launcher.cli.main`: random nested documents built from the schema's real
section and field names, random `--set` paths (real fields, sections, mappings, nonsense)
with random values (YAML snippets, dangerous tags, control characters, unicode, huge
numbers). The only allowed outcomes are a clean error (exit 2, no traceback) or a valid plan
(exit 0); any other exception fails the test. tests/unit/test_property.py covers flat keys.
"""

from __future__ import annotations

import contextlib
import io
import itertools
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from launcher.cli import main
from launcher.config.recipe import Recipe

from .conftest import QUICKSTART, TRAIN_DATA

pytestmark = [pytest.mark.timeout(600)]


def _paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found: list[tuple[str, ...]] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found.append((*prefix, name))
            found += _paths(annotation, (*prefix, name))
        else:
            found.append((*prefix, name))
    return found


FIELDS = [".".join(p) for p in _paths(Recipe)]
SECTIONS = sorted({p.rsplit(".", 1)[0] for p in FIELDS if "." in p})
NAMES = sorted({part for path in FIELDS for part in path.split(".")})

tricky_text = st.sampled_from(
    [
        "",
        " ",
        "~",
        "null",
        "nan",
        ".inf",
        "-.inf",
        "1e999",
        "-0",
        "0x1F",
        "0o17",
        "1_000",
        "99999999999999999999999999",
        "true",
        "no",
        "[",
        "{",
        "]",
        "{a: 1}",
        "[1, [2, [3]]]",
        "{r: 8, quant: {type: nf4}}",
        "&a [*a]",
        "*undefined",
        "!!python/object/apply:os.system [echo pwned]",
        "!!python/name:os.system",
        "!!binary aGk=",
        "!!timestamp 2001-12-14",
        "!custom x",
        "%YAML 1.1",
        "---\n---",
        "a\nb",
        "a\x00b",
        "\x1b[31mred",
        "$(touch TL_PWNED)",
        "`touch TL_PWNED`",
        "; rm -rf ~",
        "'quoted'",
        '"dq"',
        "ünïcödé ✓ 中文",
        "tiny:llama",
        "tiny:nope",
        "x" * 5000,
    ]
)
values = st.one_of(tricky_text, st.text(max_size=40), st.integers(), st.floats().map(str))


def _run(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def _check(code: int, err: str) -> None:
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err
    if code == 2:
        assert "error: " in err and "problem" in err, err


@pytest.mark.fault_class("property: random --set paths and values (CLI)")
@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    keys=st.lists(
        st.one_of(
            st.sampled_from(FIELDS),
            st.sampled_from(SECTIONS),
            st.sampled_from(["env.FOO", "resources.sbatch_extra.mail-type", "method.quant.x.y"]),
            st.lists(st.sampled_from([*NAMES, "bogus", ""]), min_size=1, max_size=4).map(".".join),
            st.text(max_size=15),
        ),
        max_size=5,
    ),
    vals=st.lists(values, min_size=5, max_size=5),
)
def test_random_overrides_through_the_cli(keys: list[str], vals: list[str]) -> None:
    argv = ["plan", str(QUICKSTART)]
    for key, value in zip(keys, vals, strict=False):
        argv += ["--set", f"{key}={value}"]
    _check(*_run(argv))


def _section_doc(draw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": draw(st.one_of(st.just("t"), st.text(max_size=10))),
        "model": {"name_or_path": "tiny:llama"},
        "data": {"train": str(TRAIN_DATA)},
    }
    for path in draw(st.lists(st.sampled_from(FIELDS), max_size=8)):
        node = doc
        parts = path.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = draw(
            st.one_of(
                values,
                st.booleans(),
                st.none(),
                st.lists(values, max_size=3),
                st.dictionaries(st.sampled_from(NAMES), values, max_size=3),
            )
        )
    if draw(st.booleans()):  # and sometimes a whole section replaced by junk
        doc[draw(st.sampled_from(SECTIONS))] = draw(st.one_of(values, st.lists(values)))
    return doc


@st.composite
def documents(draw: Any) -> dict[str, Any]:
    return _section_doc(draw)


_counter = itertools.count()


@pytest.mark.fault_class("property: random nested recipe documents (CLI)")
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(doc=documents())
def test_random_nested_documents_through_the_cli(doc: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / f"r{next(_counter)}.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    _check(*_run(["plan", str(path)]))


@pytest.mark.fault_class("property: random recipe text (CLI)")
@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=300))
def test_random_recipe_text_through_the_cli(
    text: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("t") / "r.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    _check(*_run(["plan", str(path)]))
