"""Print (or --write into README.md) the recipe reference generated from the schema."""

from __future__ import annotations

import sys
import typing
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from launcher.config.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- recipe-reference:begin -->", "<!-- recipe-reference:end -->"


def _type(annotation: Any) -> str:
    """The annotation as a reader writes it, without Annotated's constraints (pydantic's
    FieldInfo); a field's description states the limits a user must know."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _type(args[0])
    if origin in (dict, list):
        return f"{origin.__name__}[{', '.join(_type(arg) for arg in args)}]"
    text = str(annotation).replace("typing.", "").replace("Literal", "").replace("NoneType", "null")
    return text.replace("<class '", "").replace("'>", "")


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += _rows(ann, f"{prefix}{name}.")
            continue
        if field.default is not PydanticUndefined:
            default = f"`{field.default!r}`"
        elif field.default_factory is not None:
            default = f"`{field.default_factory()!r}`"  # type: ignore[call-arg]
        else:
            default = "**required**"
        desc = (field.description or "").replace("|", "\\|")
        kind = _type(ann).replace("|", "\\|")
        rows.append(f"| `{prefix}{name}` | {kind} | {default} | {desc} |")
    return rows


def reference() -> str:
    head = ["| field | type | default | meaning |", "|---|---|---|---|"]
    return "\n".join([BEGIN, *head, *_rows(Recipe, ""), END])


def main() -> int:
    text = reference()
    if "--write" in sys.argv:
        readme = ROOT / "README.md"
        body = readme.read_text()
        start, end = body.index(BEGIN), body.index(END) + len(END)
        readme.write_text(body[:start] + text + body[end:])
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
