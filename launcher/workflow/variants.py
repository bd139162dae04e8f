"""A sweep's variants: every combination of the grids, with the combinations that mean the
same thing collapsed into one (pure: no I/O beyond reading the recipe file).

`--grid method.r=4,16 --grid method.kind=lora,full` gives four combinations, but a LoRA rank
means nothing under full fine-tuning: r=4/full and r=16/full train the same thing, so they
are one variant, named after the settings that apply to it (`kind=full`).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.config.recipe import Recipe, load_recipe
from launcher.config.resume import flatten
from launcher.errors import Problem, RecipeError


@dataclass
class Variant:
    name: str
    overrides: list[str]  # the grid assignments that apply to it, as --set KEY=VALUE
    same_as: list[str] = field(default_factory=list)  # combinations collapsed into it


def parse_grids(items: list[str]) -> list[tuple[str, list[str]]]:
    """["method.r=4,16"] -> [("method.r", ["4", "16"])]; commas inside [...] or {...} stay."""
    grids, problems = [], []
    for item in items:
        key, sep, values = item.partition("=")
        parts = _split(values)
        if not sep or not key.strip() or not parts:
            problems.append(
                Problem(f"--grid {item}", "expected KEY=V1,V2,...", "e.g. --grid method.r=4,16")
            )
            continue
        grids.append((key.strip(), parts))
    keys = [k for k, _ in grids]
    for key in sorted({k for k in keys if keys.count(k) > 1}):
        problems.append(
            Problem(f"--grid {key}", "given twice", "one --grid per key, values comma-separated")
        )
    if problems:
        raise RecipeError(problems, "usage")
    return grids


def _split(values: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in values:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    parts.append(current.strip())
    return [p for p in parts if p]


def applies(recipe: Recipe, key: str) -> bool:
    """Whether a recipe field changes what is trained, given the rest of the recipe. Only
    what is known not to matter is left out (a field of another method may still count)."""
    if key in ("name", "run_dir"):
        return False
    if key.startswith("method.") and key != "method.kind":
        if recipe.method.kind == "full":
            return False  # no adapter: its rank, alpha, targets and quantization are unused
        if key.startswith("method.quant.") and recipe.method.kind == "lora":
            return False  # quantization is QLoRA's
    return True


def effective(recipe: Recipe) -> dict[str, Any]:
    """The recipe's fields that decide what is trained: two variants with equal ones collapse."""
    return {k: v for k, v in flatten(recipe.model_dump(mode="json")).items() if applies(recipe, k)}


def expand(path: Path, grids: list[tuple[str, list[str]]], sets: list[str]) -> list[Variant]:
    """Every combination, validated like `--set` (RecipeError listing every bad one),
    collapsed by what it trains, in grid order."""
    variants: list[Variant] = []
    seen: dict[str, Variant] = {}
    problems: list[Problem] = []
    for combo in itertools.product(*[[(k, v) for v in values] for k, values in grids]):
        assignments = [f"{k}={v}" for k, v in combo]
        try:
            recipe = load_recipe(path, [*sets, *assignments])
        except RecipeError as exc:
            problems += [
                Problem(f"--grid {' '.join(assignments)}: {p.path}", p.message, p.fix)
                for p in exc.problems
            ]
            continue
        kept = [(k, v) for k, v in combo if applies(recipe, k)]
        name = variant_name(kept)
        key = repr(sorted(effective(recipe).items()))
        if key in seen:
            seen[key].same_as.append(variant_name(list(combo)))
            continue
        seen[key] = Variant(name, [f"{k}={v}" for k, v in kept])
        variants.append(seen[key])
    if problems:
        raise RecipeError(problems, f"sweep over {path}")
    return variants


def variant_name(pairs: list[tuple[str, str]]) -> str:
    """`r=4_kind=lora`: the last part of each key and its value, safe as a folder name."""
    if not pairs:
        return "base"
    text = "_".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in pairs)
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", text)[:120]
