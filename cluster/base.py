"""The Backend protocol: a plan becomes a request, the request becomes a running job.

As torchx's `schedule(submit_dryrun(app))`: `prepare(plan)` returns the request, a frozen record
of exactly what will run (local: the command, its environment, where it runs and logs; SLURM:
the sbatch parameters, the script submitit renders from them, each node's command).
`tune-launch RECIPE --dry-run` prints it; `submit(request)` runs it and nothing else, and
writes the same printout to RUN_DIR/request.txt. `choose_backend(plan)` is the one place that
picks the backend, for the dry run and the run alike.

`status` / `wait` / `cancel` / `logs` work from the run directory alone: RUN_DIR/job.json
records the backend and the job id.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from launcher.config.plan import Plan
from launcher.errors import Problem, RecipeError, RunError
from launcher.rundir import RunDir

ENDED = ("COMPLETED", "FAILED", "CANCELLED", "PREEMPTED")  # states a job does not leave


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
        RunDir.write_atomic(RunDir(run_dir).job_file, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, run_dir: Path) -> JobRecord | None:
        path = RunDir(run_dir).job_file
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text()))


class Request(Protocol):
    """What a backend will run, prepared from a plan."""

    @property
    def run_dir(self) -> str: ...

    def render(self) -> str:
        """The request as `--dry-run` prints it and RUN_DIR/request.txt records it: every
        field, so two requests that print the same are the same."""
        ...


R = TypeVar("R", bound=Request)


class Backend(Protocol[R]):
    name: str

    def prepare(self, plan: Plan) -> R:
        """The request for this plan; pure: nothing is written, nothing starts."""
        ...

    def submit(self, request: R) -> int:
        """Run the request. The local backend runs it in the foreground and returns its exit
        code (0 ok, 1 failed); SLURM returns 0 once the job is queued."""
        ...

    def wait(self, run_dir: Path) -> int:
        """Follow the run directory's job to its end: 0 if it completed, else 1."""
        ...

    def status(self, run_dir: Path) -> JobRecord: ...

    def cancel(self, run_dir: Path) -> None: ...

    def logs(self, run_dir: Path, rank: int, follow: bool) -> Iterator[str]: ...


def record_request(request: Request) -> None:
    """RUN_DIR/request.txt: the request a backend is about to submit, as the dry run prints it."""
    run = RunDir(request.run_dir)
    run.path.mkdir(parents=True, exist_ok=True)
    RunDir.write_atomic(run.request_file, request.render() + "\n")


def choose_backend(plan: Plan, stages: Sequence[str] | None = None) -> Backend[Any]:
    """The plan's backend: resources.backend, where auto means SLURM for more than one node
    (sbatch must be on PATH) and local for one. Exit 2 for a choice that cannot run.
    `stages` (--stages; default all): on SLURM, the stages after training the recipe enables
    are jobs chained after it (cluster/chain.py); the local pipeline runs them itself."""
    res = plan.recipe.resources
    choice = res.backend
    if choice == "auto" and plan.nodes > 1:
        if shutil.which("sbatch") is None:
            raise RecipeError(
                [
                    Problem(
                        "resources.backend",
                        f"auto runs {plan.nodes} nodes (resources.nodes) on SLURM, but sbatch "
                        "is not on PATH on this host",
                        "run it where sbatch is (a SLURM login node), or on one node with "
                        "--nodes 1; `--backend slurm --dry-run` prints the SLURM job here",
                        choice,
                    )
                ],
                "usage",
            )
        choice = "slurm"
    if choice == "local" and plan.nodes > 1:
        raise RecipeError(
            [
                Problem(
                    "resources.nodes",
                    "the local backend runs on one node",
                    "use --backend slurm (or --nodes 1)",
                    plan.nodes,
                )
            ],
            "usage",
        )
    return backend_named("slurm" if choice == "slurm" else "local", stages)


def backend_named(name: str, stages: Sequence[str] | None = None) -> Backend[Any]:
    """The backend a job record names."""
    if name == "slurm":
        from cluster.slurm import SlurmBackend

        return SlurmBackend(tuple(stages)) if stages is not None else SlurmBackend()
    if name == "local":
        from cluster.local import LocalBackend

        return LocalBackend()
    raise RunError(f"unknown backend {name!r} (job.json): expected local or slurm")
