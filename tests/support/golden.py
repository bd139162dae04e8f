"""Golden files: rendered output compared with a file kept in the repository.

`UPDATE_GOLDEN=1` rewrites every golden file a test compares (and skips the test, which then
checks nothing); the next run without it checks them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def updating() -> bool:
    return bool(os.environ.get("UPDATE_GOLDEN"))


def check_golden(golden: Path, text: str) -> None:
    """Assert `text` equals the golden file, or rewrite it under UPDATE_GOLDEN=1."""
    if updating():
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
        return
    assert golden.is_file(), f"{golden} is missing (UPDATE_GOLDEN=1 writes it)"
    assert golden.read_text() == text, f"{golden} differs (UPDATE_GOLDEN=1 to accept)"


def skip_if_updated() -> None:
    """End a test whose golden files UPDATE_GOLDEN=1 just rewrote."""
    if updating():
        pytest.skip("golden files rewritten: rerun without UPDATE_GOLDEN to check them")
