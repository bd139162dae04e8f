"""User-facing errors: every problem with its field path, the value seen and the fix.

A `RecipeError` is raised once, after every problem has been collected, and the CLI prints
it and exits 2 without a traceback. `RunError` is a run that failed (exit 1).
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import Any

_MISSING = object()


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe, as a user must read it."""

    path: str
    message: str
    fix: str = ""
    value: Any = _MISSING

    def render(self) -> str:
        line = f"  - {self.path or '<recipe>'}: {self.message}"
        if self.value is not _MISSING:
            line += f" (got {_short(self.value)})"
        if self.fix:
            line += f"\n      fix: {self.fix}"
        return line


# a bounded repr: the value seen may be huge (a YAML alias bomb expands to millions of items)
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 3, 8, 8, 8, 8
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 200


def _short(value: Any, limit: int = 80) -> str:
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RecipeError(Exception):
    """A recipe (or usage) is wrong: exit code 2, every problem listed."""

    def __init__(self, problems: list[Problem], source: str = "recipe") -> None:
        self.problems = problems
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        count = len(self.problems)
        head = f"{self.source}: {count} problem{'s' if count != 1 else ''}"
        return "\n".join([head, *(p.render() for p in self.problems)])


class RunError(Exception):
    """A run (training, merge, serve, eval) failed: exit code 1."""
