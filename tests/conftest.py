"""Suite-wide ordering: tests marked `export` run last. They need llama.cpp, which `make test`
builds in the background at the lowest CPU priority while the rest of the suite runs
(scripts/setup.sh, LLAMA_CPP_BUILD=background); tests/e2e/test_export.py waits for it."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("export") is not None)  # stable
