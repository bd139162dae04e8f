"""The Backend protocol: how a plan becomes a running job, and how we ask about it.

A backend is small on purpose (torchx's Scheduler, submitit's executor): `dryrun` says
exactly what would run, `submit` runs it, and `status` / `cancel` / `logs` work from the
run directory alone (RUN_DIR/job.json records the backend and the job id).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from launcher.config.plan import Plan

STATES = ("PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "PREEMPTED", "UNKNOWN")


@dataclass
class JobRecord:
    """RUN_DIR/job.json."""

    backend: str  # local | slurm
    job_id: str
    state: str = "PENDING"
    pids: list[int] = field(default_factory=list)
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, run_dir: Path) -> None:
        path = run_dir / "job.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, run_dir: Path) -> JobRecord | None:
        path = run_dir / "job.json"
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text()))


class Backend(Protocol):
    name: str

    def dryrun(self, plan: Plan) -> dict[str, str]:
        """Title -> text of everything that would run (scripts, commands)."""
        ...

    def submit(self, plan: Plan, *, wait: bool) -> int:
        """Start the job; with wait, follow it and return its exit code (0 ok, 1 failed)."""
        ...

    def status(self, run_dir: Path) -> JobRecord: ...

    def cancel(self, run_dir: Path) -> None: ...

    def logs(self, run_dir: Path, rank: int, follow: bool) -> Iterator[str]: ...
