"""`tune-launch status | cancel | logs RUN_DIR`: from the run directory alone.

RUN_DIR/job.json names the backend that ran the job (cluster.base.JobRecord); each command
asks that backend (cluster/local.py: recorded process group; cluster/slurm.py: sacct,
scancel, submitit's files). Exit codes: 0 ok (status: the job completed or is still going),
1 the job failed / was cancelled / cannot be found.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from cluster.base import Backend, JobRecord, backend_named
from launcher.errors import RunError
from launcher.rundir import RunDir


def _backend(run_dir: Path) -> tuple[Backend[Any], JobRecord]:
    record = JobRecord.load(run_dir)
    if record is None:
        raise RunError(
            f"no job recorded in {run_dir} (no job.json): was it started with "
            f"`tune-launch RECIPE --run-dir {run_dir}`?"
        )
    return backend_named(record.backend), record


def print_status(run_dir: Path) -> int:
    """One line of state, then what is known: error, requeues, progress, where to look."""
    run_dir = Path(run_dir)
    backend, _ = _backend(run_dir)
    record = backend.status(run_dir)
    print(f"{run_dir}: {record.state} ({record.backend} job {record.job_id})")
    extra = record.extra
    if record.backend == "slurm":
        details = [f"slurm state {extra.get('slurm_state', '?')}"]
        if extra.get("nodes"):
            details.append(f"nodes {extra['nodes']}")
        if extra.get("requeues"):
            details.append(f"requeued {extra['requeues']}x (preemption/time limit)")
        print("  " + ", ".join(details))
    run = RunDir(run_dir)
    step = run.last_step()
    if step is not None:
        print(f"  last logged step: {step}")
    if run.final.is_dir():
        print(f"  final model: {run.final}")
    if record.error:
        print(f"  error: {record.error}")
    if record.state in ("FAILED", "CANCELLED", "PREEMPTED", "UNKNOWN"):
        print(f"  logs: tune-launch logs {run_dir} [--rank N]")
        return 1
    return 0


def cancel(run_dir: Path) -> int:
    run_dir = Path(run_dir)
    backend, record = _backend(run_dir)
    backend.cancel(run_dir)
    if record.backend == "local":
        print(f"cancelled local job {record.job_id} in {run_dir}")
    return 0


def print_logs(run_dir: Path, rank: int = 0, follow: bool = False) -> int:
    run_dir = Path(run_dir)
    backend, _ = _backend(run_dir)
    shown = False
    try:
        for line in backend.logs(run_dir, rank, follow):
            shown = True
            print(line.rstrip("\n"), flush=True)
    except KeyboardInterrupt:
        return 0
    if not shown:
        print(f"no log yet for rank {rank} in {RunDir(run_dir).logs}", file=sys.stderr)
    return 0
