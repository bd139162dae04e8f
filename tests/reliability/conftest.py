"""Helpers for the reliability tier: the real CLI as a background process, the process
table, waiting on a run directory, the SLURM test cluster.

Every fault here is injected for real (signals to real processes, a real small filesystem,
real bytes in data files); each test records its fault class with
`record_property("fault_class", ...)` or the `fault_class("...")` marker (for hypothesis
tests, whose body runs many times), and a weakness found but not failed on with
`record_property("finding", ...)`; both land in the junit XML that
scripts/reliability_report.py turns into docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

# the CLI environment and paths are the training tier's (one definition)
from train.conftest import PYTHON, QUICKSTART, REPO, cli_env, metrics

TRAIN_DATA = REPO / "recipes" / "data" / "quickstart_train.jsonl"
# short quickstart runs (tiny Llama, LoRA, ZeRO-2, 2 processes on gloo): a checkpoint every
# 10 steps, no validation split and no serve/eval (they would only cost time)
SHORT = (
    "train.save_steps=10",
    "train.logging_steps=5",
    "data.val_split=0",
    "serve.enabled=false",
    "eval.enabled=false",
)
SLURM_2_NODES = ("--backend", "slurm", "--nodes", "2", "--gpus-per-node", "1", "--wait")
T = TypeVar("T")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fault_class(name): the fault or input class a reliability test injects"
    )


@pytest.fixture(autouse=True)
def _fault_class_marker(request: pytest.FixtureRequest, record_property: Any) -> None:
    marker = request.node.get_closest_marker("fault_class")
    if marker is not None:
        record_property("fault_class", marker.args[0])


def cli_argv(
    run_dir: Path | None,
    *sets: str,
    recipe: Path = QUICKSTART,
    extra: tuple[str, ...] = (),
    command: str = "run",
) -> list[str]:
    argv = [PYTHON, "-m", "launcher.cli", command, str(recipe)]
    if command == "run":
        argv += ["--stages", "train"]
    argv += list(extra)
    if run_dir is not None:
        argv += ["--run-dir", str(run_dir)]
    for assignment in sets:
        argv += ["--set", assignment]
    return argv


def run_cli(
    run_dir: Path | None,
    *sets: str,
    recipe: Path = QUICKSTART,
    env: dict[str, str] | None = None,
    extra: tuple[str, ...] = (),
    command: str = "run",
    cwd: Path = REPO,
    timeout: float = 420,
) -> subprocess.CompletedProcess[str]:
    """`tune-launch run RECIPE --stages train [--run-dir DIR] --set ...`, as a user runs it."""
    return subprocess.run(
        cli_argv(run_dir, *sets, recipe=recipe, extra=extra, command=command),
        cwd=cwd,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tune(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Any other `tune-launch` command (status, logs, cancel)."""
    return subprocess.run(
        [PYTHON, "-m", "launcher.cli", *args],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Background:
    """`tune-launch` in the background, its output in files (a pipe could fill and block)."""

    def __init__(
        self, argv: list[str], env: dict[str, str], out_dir: Path, cwd: Path = REPO
    ) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = out_dir / "stdout.txt"
        self.stderr_path = out_dir / "stderr.txt"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def explain(self) -> str:
        return (
            f"exit {self.proc.returncode}\n--- stdout\n{self.stdout[-3000:]}\n"
            f"--- stderr\n{self.stderr[-6000:]}"
        )

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


Starter = Callable[..., Background]


@pytest.fixture
def background(tmp_path: Path) -> Iterator[Starter]:
    """Start `tune-launch` in the background; whatever is left at the end is killed (with
    every process of its run directory), so a failing test never leaves training behind."""
    started: list[tuple[Background, Path | None]] = []

    def start(
        run_dir: Path | None,
        *sets: str,
        env: dict[str, str] | None = None,
        recipe: Path = QUICKSTART,
        extra: tuple[str, ...] = (),
    ) -> Background:
        out = tmp_path / f"cli-{len(started)}"
        argv = cli_argv(run_dir, *sets, recipe=recipe, extra=extra)
        job = Background(argv, env or cli_env(), out)
        started.append((job, run_dir))
        return job

    yield start
    for job, run_dir in started:
        job.kill()
        if run_dir is not None:
            for proc in mentioning(run_dir):
                with contextlib.suppress(psutil.Error):
                    proc.kill()


def wait_for(predicate: Callable[[], T], timeout: float, what: str, poll: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def cmdline(proc: psutil.Process) -> list[str]:
    try:
        if proc.status() == psutil.STATUS_ZOMBIE:
            return []
        return proc.cmdline()
    except psutil.Error:
        return []


def mentioning(run_dir: Path) -> list[psutil.Process]:
    """Every live process (but this one) whose command line mentions the run directory:
    ranks, torchrun, submitit's task runner, a tune-launch still following the job."""
    key, me = str(run_dir), os.getpid()
    return [p for p in psutil.process_iter() if p.pid != me and any(key in a for a in cmdline(p))]


def rank_processes(run_dir: Path) -> dict[int, psutil.Process]:
    """rank -> the training process of that rank (`python -m launcher.train RUN_DIR`)."""
    ranks = {}
    for proc in mentioning(run_dir):
        argv = cmdline(proc)
        if "launcher.train" not in argv or "torch.distributed.run" in argv:
            continue
        try:
            rank = proc.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None:
            ranks[int(rank)] = proc
    return ranks


def wait_ranks(run_dir: Path, count: int = 2, timeout: float = 400) -> dict[int, psutil.Process]:
    """The run's `count` rank processes, once they all run."""

    def found() -> dict[int, psutil.Process]:
        ranks = rank_processes(run_dir)
        return ranks if len(ranks) == count else {}

    return wait_for(found, timeout, f"{count} ranks of {run_dir}")


def alive(pids: list[int]) -> list[int]:
    """The pids of `pids` still running (a zombie counts as gone)."""
    found = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                found.append(pid)
    return found


def assert_no_leftovers(run_dir: Path, within_s: float = 30) -> None:
    """No process of the run is left: none mentions the run directory on its command line."""
    deadline = time.monotonic() + within_s
    while True:
        left = [(p.pid, cmdline(p)) for p in mentioning(run_dir)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not left, f"processes left behind: {left}"


def complete_steps(run_dir: Path) -> list[int]:
    found = []
    for path in (run_dir / "checkpoints").glob("checkpoint-*"):
        if (path / "COMPLETE").is_file():
            found.append(int(path.name.removeprefix("checkpoint-")))
    return sorted(found)


def complete(run_dir: Path, step: int) -> bool:
    return (run_dir / "checkpoints" / f"checkpoint-{step}" / "COMPLETE").is_file()


def loss_steps(run_dir: Path) -> list[int]:
    return [int(m["step"]) for m in metrics(run_dir) if m.get("loss") is not None]


def resumed_step(log_text: str) -> int | None:
    """The step a run resumed from, from launcher/train/entry.py's
    `resuming from .../checkpoint-N (step N)`."""
    found = re.findall(r"resuming from \S*checkpoint-(\d+) \(step (\d+)\)", log_text)
    return int(found[-1][1]) if found else None


def explain(result: subprocess.CompletedProcess[str]) -> str:
    return (
        f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n"
        f"--- stderr\n{result.stderr[-6000:]}"
    )


def job_record(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "job.json").read_text())


def require_slurm() -> None:
    """Skip (with the reason) unless the SLURM test cluster answers with 2 usable nodes."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        pytest.skip("SLURM not installed (no sinfo/sbatch); run cluster/testcluster/up.sh")
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if "is UP" not in ping.stdout:
        pytest.skip("slurmctld does not answer `scontrol ping`; run cluster/testcluster/up.sh")
    nodes = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=30
    ).stdout.splitlines()
    usable = [line for line in nodes if re.search(r"\s(idle|mix|alloc|comp)", line)]
    if len(usable) < 2:
        pytest.skip(f"the SLURM test cluster needs 2 usable nodes, sinfo says: {nodes}")


def squeue_has(job_id: str) -> bool:
    out = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30
    ).stdout.strip()
    return bool(out)
