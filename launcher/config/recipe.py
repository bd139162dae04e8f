"""Loading a recipe: `load_recipe(path, overrides)`, `localize`, `recipe_to_yaml`.

The schema itself (one closed pydantic model per section) is `schema.py`; its names are
re-exported here so `from launcher.config.recipe import Recipe` is the one import callers need.
Loading collects every problem (unknown keys with the closest valid one, wrong types, bad
values) and raises a single `RecipeError`. Cross-section rules live in `rules.py`.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from launcher.config.schema import DataConfig, DataSources, Recipe, time_minutes
from launcher.errors import Problem, RecipeError

# the schema names callers import from here (the cluster backends take time_minutes too)
__all__ = [
    "DataConfig",
    "Recipe",
    "apply_override",
    "list_item_model",
    "load_recipe",
    "localize",
    "parse_yaml",
    "problems_from_validation",
    "recipe_to_yaml",
    "section_fields",
    "time_minutes",
]


class _SafeLoader(yaml.SafeLoader):
    """safe_load that also refuses duplicate keys (a silent overwrite hides typos)."""


def _no_duplicates(loader: _SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, str | int | float | bool) and key is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"keys must be plain strings, not {key!r}", key_node.start_mark
            )
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_SafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_SafeLoader)
    except yaml.YAMLError as exc:
        raise RecipeError(
            [Problem("", f"not valid YAML: {exc}".replace("\n", " "), "fix the YAML syntax")],
            source,
        ) from None


def section_fields(path: tuple[str, ...]) -> dict[str, Any] | None:
    """The fields of the schema section at `path`, or None if `path` is not a section."""
    model: type[BaseModel] = Recipe
    item: type[BaseModel] | None = None  # the model of a list's items (data.train.0)
    for part in path:
        if item is not None and part.isdigit():
            model, item = item, None
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif (item := list_item_model(annotation)) is None:
            return None
    return dict(model.model_fields) if item is None else None


def list_item_model(annotation: Any) -> type[BaseModel] | None:
    """M of a `list[M]` (or `str | list[M]`) annotation, M a section model."""
    members = typing.get_args(annotation) if typing.get_origin(annotation) else ()
    if typing.get_origin(annotation) is list:
        members = (annotation,)
    for member in members:
        if typing.get_origin(member) is list:
            (inner,) = typing.get_args(member)
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
        elif member is not annotation and (found := list_item_model(member)):
            return found
    return None


def _unknown_key_problem(loc: tuple[str, ...], value: Any) -> Problem:
    parent, key = loc[:-1], str(loc[-1])
    fields = sorted(section_fields(parent) or {})
    close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
    fix = f"did you mean '{close[0]}'? " if close else ""
    fix += f"valid keys here: {', '.join(fields)}"
    return Problem(".".join(loc), "unknown key", fix, value)


_FIX_BY_TYPE = {
    "missing": "add this required field",
    "int_parsing": "use a whole number",
    "int_type": "use a whole number",
    "int_from_float": "use a whole number",
    "float_parsing": "use a number",
    "float_type": "use a number",
    "bool_parsing": "use true or false",
    "bool_type": "use true or false",
    "string_type": "use a string (quote it)",
    "list_type": "use a list",
    "dict_type": "use a mapping",
    "model_type": "use a mapping of this section's keys",
    "greater_than": "use a larger value",
    "greater_than_equal": "use a larger value",
    "less_than": "use a smaller value",
    "less_than_equal": "use a smaller value",
    "string_pattern_mismatch": "use only letters, digits, _ . - (at most 64)",
}


# the member of a union pydantic names in an error's location (str | list[DataSource]: "str",
# "list[DataSource]"); not part of the field path a user writes
_UNION_MEMBER = re.compile(r"(list|dict|literal|function-after)\[.*\]|str|int|float|bool")
_SCALAR_MEMBERS = ("str", "int", "float", "bool")


def _wrong_member(err: Any, errors: list[Any]) -> bool:
    """A list or mapping given to `str | list[M]` fails the str member too: that error says
    nothing a user can act on beside the list member's own (a mapping for a list, the items'
    errors)."""
    loc = tuple(str(p) for p in err["loc"])
    if not loc or loc[-1] not in _SCALAR_MEMBERS or not isinstance(err.get("input"), list | dict):
        return False
    base = loc[:-1]
    return any(
        len(other["loc"]) > len(base)
        and tuple(str(p) for p in other["loc"][: len(base)]) == base
        and str(other["loc"][len(base)]) not in _SCALAR_MEMBERS
        for other in errors
    )


def problems_from_validation(exc: ValidationError, prefix: tuple[str, ...] = ()) -> list[Problem]:
    problems: list[Problem] = []
    errors = exc.errors()
    for err in errors:
        if _wrong_member(err, errors):
            continue
        loc = prefix + tuple(str(p) for p in err["loc"])
        loc = loc[:1] + tuple(p for p in loc[1:] if not _UNION_MEMBER.fullmatch(p))
        kind = err["type"]
        if kind == "extra_forbidden":
            problems.append(_unknown_key_problem(loc, err.get("input")))
            continue
        if kind in ("literal_error", "enum"):
            expected = err.get("ctx", {}).get("expected", "")
            fix = f"use one of {expected}"
        else:
            fix = _FIX_BY_TYPE.get(kind, "see the recipe reference in README.md")
        problem = Problem(".".join(loc), err["msg"], fix)
        if kind != "missing":
            problem = Problem(".".join(loc), err["msg"], fix, err.get("input"))
        problems.append(problem)
    # a union (list | "all-linear") reports once per member: keep the first per path
    seen: set[str] = set()
    unique = []
    for problem in problems:
        base = re.sub(
            r"\.(list\[str\]|literal\[.*\]|str|int|bool|function-after\[.*\])$", "", problem.path
        )
        if base in seen:
            continue
        seen.add(base)
        unique.append(Problem(base, problem.message, problem.fix, problem.value))
    return unique


def _is_mapping_field(path: tuple[str, ...]) -> bool:
    """Whether `path` names a free-form mapping field (env, resources.sbatch_extra)."""
    parent = section_fields(path[:-1])
    field = parent.get(path[-1]) if parent else None
    return field is not None and typing.get_origin(field.annotation) is dict


def apply_override(data: dict[str, Any], assignment: str) -> Problem | None:
    """Apply one `--set a.b.c=value` (value parsed as YAML) to the raw recipe mapping."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        return Problem(
            f"--set {assignment}", "expected KEY=VALUE", "e.g. --set train.learning_rate=1e-4"
        )
    path = tuple(key.split("."))
    fields = section_fields(path[:-1])
    if fields is None and len(path) >= 2 and _is_mapping_field(path[:-1]):
        fields = {path[-1]: None}  # a key inside a mapping field: env.FOO, resources.sbatch_extra.x
    if fields is None or path[-1] not in fields:
        missing = next(i for i in range(len(path)) if section_fields(path[: i + 1]) is None)
        return _unknown_key_problem(path[: missing + 1], raw)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value
    return None


def load_recipe(
    path: str | Path,
    overrides: list[str] | None = None,
    *,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
) -> Recipe:
    """Read, override and validate a recipe file. Raises RecipeError listing every problem."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise RecipeError(
            [Problem("", f"recipe file not found: {path}", "check the path")], "usage"
        )
    data = parse_yaml(path.read_text(encoding="utf-8", errors="replace"), source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(
            [
                Problem(
                    "", "a recipe is a mapping of sections", "start with 'name:', 'model:'", data
                )
            ],
            source,
        )
    data.setdefault("name", _default_name(path))
    return recipe_from_data(data, source, overrides, nodes=nodes, gpus_per_node=gpus_per_node)


def recipe_from_data(
    data: dict[str, Any],
    source: str,
    overrides: list[str] | None = None,
    *,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
) -> Recipe:
    """Override and validate a recipe mapping (a file's, or a workflow stage's); RecipeError
    listing every problem, `source` naming where the mapping came from."""
    problems = []
    for assignment in overrides or []:
        problem = apply_override(data, assignment)
        if problem:
            problems.append(problem)
    if nodes is not None:
        data.setdefault("resources", {})
        if isinstance(data["resources"], dict):
            data["resources"]["nodes"] = nodes
    if gpus_per_node is not None:
        data.setdefault("resources", {})
        if isinstance(data["resources"], dict):
            data["resources"]["gpus_per_node"] = gpus_per_node
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(problems + problems_from_validation(exc), source) from None
    if problems:
        raise RecipeError(problems, source)
    return recipe


def _default_name(path: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", path.stem).lstrip("-_.") or "run"
    return name[:64]


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------------------------
# Local paths: relative to the recipe file, made absolute; hub ids left alone.

_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


def _looks_local(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or value.endswith(_FILE_SUFFIXES)


def _localize_one(
    value: str, base: Path, field: str, problems: list[Problem], *, is_data: bool
) -> str:
    if value.startswith("tiny:"):
        return value
    candidate = (base / Path(value).expanduser()).resolve()
    if candidate.exists():
        return str(candidate)
    if _looks_local(value):
        kind = "data file" if is_data else "model directory"
        problems.append(
            Problem(
                field,
                f"{kind} not found: {candidate}",
                "check the path (relative paths are relative to the recipe file)",
                value,
            )
        )
    return value  # a hub id


def _localize_sources(
    value: DataSources, base: Path, field: str, problems: list[Problem]
) -> DataSources:
    """A data field's local paths made absolute: the string form, or each source's path."""
    if isinstance(value, str):
        return _localize_one(value, base, field, problems, is_data=True)
    return [
        source.model_copy(
            update={
                "path": _localize_one(
                    source.path, base, f"{field}.{i}.path", problems, is_data=True
                )
            }
        )
        for i, source in enumerate(value)
    ]


def localize(recipe: Recipe, base_dir: Path) -> Recipe:
    """Recipe with local paths made absolute; RecipeError for local paths that do not exist."""
    problems: list[Problem] = []
    model = recipe.model.model_copy(
        update={
            "name_or_path": _localize_one(
                recipe.model.name_or_path, base_dir, "model.name_or_path", problems, is_data=False
            )
        }
    )
    data_update: dict[str, Any] = {
        "train": _localize_sources(recipe.data.train, base_dir, "data.train", problems)
    }
    if recipe.data.validation:
        data_update["validation"] = _localize_sources(
            recipe.data.validation, base_dir, "data.validation", problems
        )
    eval_update: dict[str, Any] = {}
    if recipe.eval.data:
        eval_update["data"] = _localize_one(
            recipe.eval.data, base_dir, "eval.data", problems, is_data=True
        )
    if recipe.eval.lm_eval_include:
        eval_update["lm_eval_include"] = [
            _localize_one(path, base_dir, f"eval.lm_eval_include.{i}", problems, is_data=True)
            for i, path in enumerate(recipe.eval.lm_eval_include)
        ]
    if problems:
        raise RecipeError(problems, f"recipe {recipe.name}")
    return recipe.model_copy(
        update={
            "model": model,
            "data": recipe.data.model_copy(update=data_update),
            "eval": recipe.eval.model_copy(update=eval_update),
        }
    )
