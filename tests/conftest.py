"""Suite-wide order and grouping.

- Tests marked `export` run last. They need llama.cpp, which `make test` builds in the
  background at the lowest CPU priority while the rest of the suite runs (scripts/setup.sh,
  LLAMA_CPP_BUILD=background); tests/e2e/test_export.py waits for it.
- `make test` runs the suite on several pytest-xdist workers (`--dist loadscope`, with the
  scheduler below): each test module is one unit of work (its module-scoped fixtures are
  built once), and modules that share something bigger share a unit (GROUPS), which one
  worker runs whole: the real SLURM cluster (two emulated nodes: two workers' jobs would
  queue behind each other) and tests/serve's served run (one vLLM server). Trained runs that
  tests only read are built once for all workers (tests/support/shared_runs.py).
- Units are handed out longest first (GROUPS, then HEAVY, then the rest in collection order),
  one at a time as a worker runs out, so that a long one never starts last or waits behind
  another. docs/testing.md lists what each costs.
"""

from __future__ import annotations

from typing import Any

import pytest

# (group, the path prefixes of its modules), in the order they are handed out
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "slurm",
        (
            "tests/slurm/",
            "tests/reliability/test_rank_death.py",
            "tests/reliability/test_run_dir_lock_slurm.py",
            "tests/reliability/test_secrets_slurm.py",
        ),
    ),
    ("serve", ("tests/serve/",)),
)
# modules that take minutes: handed out right after the groups
HEAVY = (
    "tests/benchmarks/test_bench_smoke.py",
    "tests/train/test_objectives_run.py",
    "tests/e2e/test_quickstart.py",
    "tests/train/test_workflows.py",
    "tests/train/test_resume_anywhere.py",
    "tests/benchmarks/test_gpu_check.py",
    "tests/train/test_train_runs.py",
    "tests/e2e/test_multiturn.py",
)


def group_of(nodeid: str) -> str:
    """The unit of work a test belongs to: its group, else its module."""
    path = nodeid.split("::", 1)[0]
    for name, prefixes in GROUPS:
        if path.startswith(prefixes):
            return name
    return path


def _rank(group: str) -> int:
    names = [name for name, _ in GROUPS]
    if group in names:
        return names.index(group)
    if group in HEAVY:
        return len(names) + HEAVY.index(group)
    return len(names) + len(HEAVY)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    stray = [
        i.nodeid for i in items if i.get_closest_marker("slurm") and group_of(i.nodeid) != "slurm"
    ]
    if stray:  # run beside other SLURM jobs, it would queue behind them and time out
        raise pytest.UsageError(f"SLURM tests outside tests/conftest.py's slurm group: {stray}")
    # stable: export last, then longest units first, collection order within
    items.sort(
        key=lambda item: (
            item.get_closest_marker("export") is not None,
            _rank(group_of(item.nodeid)),
        )
    )


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadscope` over group_of's units, in collection order, one unit at a time."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

        def _reschedule(self, node: Any) -> None:
            # a new unit only when the worker holds just the test it runs (xdist's own
            # heuristic queues one behind up to two pending tests, which can be minutes)
            if node.shutting_down:
                return
            if not self.workqueue:
                node.shutdown()
                return
            if self._pending_of(self.assigned_work[node]) > 1:
                return
            self._assign_work_unit(node)

    config.option.loadscopereorder = False  # keep the longest-first order above
    return UnitScheduling(config, log)
