"""The broken-recipe corpus (tests/unit/broken/*.yaml, run by tests/unit/test_broken_recipes.py)
holds at least one case for every section of the recipe schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.config.recipe import Recipe

BROKEN = Path(__file__).resolve().parents[1] / "unit" / "broken"
SECTIONS = [
    "model",
    "method",
    "method.quant",
    "data",
    "train",
    "distributed",
    "resources",
    "merge",
    "serve",
    "eval",
    "env",
    "secrets",
]


def _expected_fields() -> list[str]:
    fields = []
    for path in sorted(BROKEN.glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        fields.append(first.removeprefix("# expect: ").strip())
    return fields


@pytest.mark.fault_class("bad recipe: broken-recipe corpus (every section)")
def test_every_section_has_a_broken_recipe() -> None:
    assert set(SECTIONS) - {"method.quant"} <= set(Recipe.model_fields)
    fields = _expected_fields()
    missing = [
        section
        for section in SECTIONS
        if not any(f == section or f.startswith(section + ".") for f in fields)
    ]
    assert not missing, f"no broken recipe for: {missing}"
    assert len(fields) >= 50
