"""A small SLURM job that runs a Python function after other jobs (submitit): a sweep's
compare job, a workflow's next-stage job. One CPU on one node of the recipe's partition."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher.config.plan import Plan


def submit_after(
    folder: Path,
    plan: Plan,
    name: str,
    dependency: str,
    fn: Callable[..., Any],
    *args: Any,
    **kwargs: Any,
) -> str:
    """Queue fn(*args, **kwargs) with `--dependency=DEPENDENCY`; its job id. With afterok, a
    failed predecessor cancels it (`--kill-on-invalid-dep=yes`) rather than leaving it
    pending forever."""
    import submitit

    from cluster.stages import stage_parameters

    params = stage_parameters(plan, "merge") | {"cpus_per_task": 1, "mem": "4G", "time": 15}
    params |= {"job_name": name, "dependency": dependency}
    params["additional_parameters"] = {"kill-on-invalid-dep": "yes"}
    executor = submitit.SlurmExecutor(
        folder=folder, max_num_timeout=0, python=shlex.quote(sys.executable)
    )
    executor.update_parameters(**params)
    return str(executor.submit(fn, *args, **kwargs).job_id)
