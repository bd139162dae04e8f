"""Suite-wide order and grouping.

- Tests marked `export` run last. They need llama.cpp, which `make test` builds in the
  background at the lowest CPU priority while the rest of the suite runs (scripts/setup.sh,
  LLAMA_CPP_BUILD=background); tests/e2e/test_export.py waits for it.
- `make test` runs the suite on several pytest-xdist workers with `--dist loadgroup`: each
  test module is one group (its module-scoped fixtures are built once), and tests that share
  something bigger than a module share a group (GROUPS below), so one worker runs them all:
  the real SLURM cluster (two emulated nodes: two workers' jobs would queue behind each
  other) and the served run of tests/serve (one vLLM server). Trained runs that tests only
  read are built once for all workers (tests/shared_runs.py).
- Groups are handed out longest first (the order of HEAVY, then everything else), so the long
  ones never start last. docs/testing.md lists what each costs.
"""

from __future__ import annotations

import pytest

# (group, does this test belong to it) in the order they are handed out
GROUPS: tuple[tuple[str, str], ...] = (
    ("slurm", "marker:slurm"),
    ("serve", "path:tests/serve/"),
)
# modules that take minutes: started right after the shared groups
HEAVY = (
    "tests/benchmarks/test_bench_smoke.py",
    "tests/train/test_objectives_run.py",
    "tests/train/test_workflows.py",
    "tests/train/test_resume_anywhere.py",
    "tests/train/test_train_runs.py",
)


def group_of(item: pytest.Item) -> str:
    path = item.nodeid.split("::", 1)[0]
    for name, rule in GROUPS:
        kind, _, value = rule.partition(":")
        if kind == "marker" and item.get_closest_marker(value) is not None:
            return name
        if kind == "path" and path.startswith(value):
            return name
    return path


def _rank(group: str) -> int:
    names = [name for name, _ in GROUPS]
    if group in names:
        return names.index(group)
    if group in HEAVY:
        return len(names) + HEAVY.index(group)
    return len(names) + len(HEAVY)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    groups = {item.nodeid: group_of(item) for item in items}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(groups[item.nodeid]))
    # stable: export last, then longest groups first, collection order within
    items.sort(
        key=lambda item: (
            item.get_closest_marker("export") is not None,
            _rank(groups[item.nodeid]),
        )
    )
