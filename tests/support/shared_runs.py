"""Expensive artefacts built once per pytest run, whichever xdist worker asks first.

`make test` runs the suite on several pytest-xdist workers; a session fixture would be
built once per worker. `build_once` keeps one copy in the run's shared base temporary
directory, behind a file lock: the first caller builds it, the others wait and reuse it (or
see the same failure, without building again)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock


def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The base temporary directory all workers of this run share."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_once(
    tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]
) -> Path:
    """ROOT/name, made by `build(ROOT/name)` the first time any worker asks for it."""
    root = shared_root(tmp_path_factory)
    out = root / name
    done, failed = root / f"{name}.done", root / f"{name}.failed"
    with FileLock(str(root / f"{name}.lock")):
        if failed.exists():
            pytest.fail(f"{name} failed to build in another worker:\n{failed.read_text()}")
        if not done.exists():
            try:
                build(out)
            except BaseException as err:
                failed.write_text(f"{type(err).__name__}: {err}"[-8000:], encoding="utf-8")
                raise
            done.touch()
    return out
