"""Print (or --write into README.md) the recipe reference generated from the schema."""

from __future__ import annotations

import sys
import typing
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from launcher.config.methods import METHODS, OBJECTIVES
from launcher.config.recipe import Recipe, list_item_model

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
    for module in ("launcher.config.schema_data.", "launcher.config.schema."):
        text = text.replace(module, "")  # a section model by its name
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
        item = list_item_model(ann)
        if item is not None:  # the list form's items: data.train[].path, ...
            rows += _rows(item, f"{prefix}{name}[].")
    return rows


def method_table() -> list[str]:
    """method.kind: what each method trains, its options, and what merge / serve / eval do
    with it (launcher/config/methods.py)."""
    rows = [
        "",
        "Methods (`method.kind`):",
        "",
        "| method.kind | trains | options | merge | serve | eval |",
        "|---|---|---|---|---|---|",
    ]
    for m in METHODS.values():
        options = []
        if m.lora:
            options += ["r", "alpha", "dropout", "use_dora", "use_rslora"]
        if m.targets:
            options.append("target_modules")
        if m.virtual_tokens:
            options.append("num_virtual_tokens")
        if m.name == "prompt":
            options.append("prompt_init_text")
        if m.quantized:
            options.append("quant")
        merge = (
            "streaming merge"
            if m.mergeable
            else ("final/ as it is" if not m.adapter else "no (exit 2)")
        )
        serve = "vLLM (merged)" if m.vllm else "no (exit 2)"
        if m.lora:
            serve = "vLLM (merged, or LoRA module unless use_dora)"
        evaluate = "in-process transformers" if m.in_process_eval else "vLLM endpoint"
        opts = ", ".join(f"`{o}`" for o in options) or "-"
        rows.append(f"| `{m.name}` | {m.summary} | {opts} | {merge} | {serve} | {evaluate} |")
    return rows


def objective_table() -> list[str]:
    """What the rank's trainer optimises: chosen by data.format, and for preference pairs by
    train.preference_loss (launcher/config/methods.py OBJECTIVES)."""
    rows = [
        "",
        "Objectives (`data.format`; preference pairs: `train.preference_loss`):",
        "",
        "| objective | optimises | trainer | data.format | reference model | options |",
        "|---|---|---|---|---|---|",
    ]
    options = {
        "dpo": "`dpo_beta`",
        "orpo": "`dpo_beta` (lambda)",
        "simpo": "`dpo_beta`, `simpo_gamma`",
        "kto": "`dpo_beta`",
        "reward": "`model.num_labels: 1`",
        "classification": "`model.num_labels`",
    }
    for o in OBJECTIVES.values():
        formats = ", ".join(f"`{f}`" for f in o.formats)
        reference = "yes (LoRA: the adapter off; full: a copy)" if o.reference else "no"
        rows.append(
            f"| `{o.name}` | {o.summary} | `{o.trainer}` | {formats} | {reference} "
            f"| {options.get(o.name, '-')} |"
        )
    return rows


def reference() -> str:
    head = ["| field | type | default | meaning |", "|---|---|---|---|"]
    tables = [*method_table(), *objective_table()]
    return "\n".join([BEGIN, *head, *_rows(Recipe, ""), *tables, END])


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
