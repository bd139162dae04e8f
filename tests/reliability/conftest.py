"""Helpers for the reliability tier: the real CLI as a background process, the process
table, waiting on a run directory.

Every fault here is injected for real (signals to real processes, a real small filesystem,
real bytes in data files); each test records its fault class with
`record_property("fault_class", ...)`, which lands in the junit XML that
scripts/reliability_report.py turns into docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_PY = REPO / ".venv" / "bin" / "python"
PYTHON = str(VENV_PY if VENV_PY.exists() else Path(sys.executable))
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
TRAIN_DATA = REPO / "recipes" / "data" / "quickstart_train.jsonl"
# short quickstart runs: LoRA, ZeRO-2, 2 processes on gloo; a checkpoint every 10 steps,
# no validation split (the eval pass would only cost time)
SHORT = [
    "train.save_steps=10",
    "train.logging_steps=5",
    "data.val_split=0",
    "serve.enabled=false",
    "eval.enabled=false",
]
T = TypeVar("T")


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"),
    )
    env.pop("TUNE_LAUNCH_FAULT", None)
    env.update(extra)
    return env


def cli_argv(run_dir: Path | None, *sets: str, recipe: Path = QUICKSTART, extra: tuple[str, ...] = ()) -> list[str]:
    argv = [PYTHON, "-m", "launcher.cli", "run", str(recipe), "--stages", "train", *extra]
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
    timeout: float = 420,
) -> subprocess.CompletedProcess[str]:
    """`tune-launch run RECIPE --stages train [--run-dir DIR] --set ...`, as a user runs it."""
    return subprocess.run(
        cli_argv(run_dir, *sets, recipe=recipe, extra=extra),
        cwd=REPO,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Background:
    """`tune-launch` in the background, its output in files (a pipe could fill and block)."""

    def __init__(self, argv: list[str], env: dict[str, str], out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = out_dir / "stdout.txt"
        self.stderr_path = out_dir / "stderr.txt"
        self._out = self.stdout_path.open("wb")
        self._err = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._out.close()
            self._err.close()

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


@pytest.fixture
def background(tmp_path: Path) -> Iterator[Callable[..., Background]]:
    """Start `tune-launch` processes in the background; whatever is left is killed at the end
    (with its run's ranks), so a failing test never leaves training behind."""
    started: list[tuple[Background, Path | None]] = []

    def start(
        run_dir: Path | None,
        *sets: str,
        env: dict[str, str] | None = None,
        recipe: Path = QUICKSTART,
        extra: tuple[str, ...] = (),
    ) -> Background:
        out = tmp_path / f"cli-{len(started)}"
        job = Background(cli_argv(run_dir, *sets, recipe=recipe, extra=extra), env or cli_env(), out)
        started.append((job, run_dir))
        return job

    yield start
    for job, run_dir in started:
        job.kill()
        if run_dir is not None:
            for proc in run_processes(run_dir):
                with_suppress_kill(proc)


def with_suppress_kill(proc: psutil.Process) -> None:
    try:
        proc.kill()
    except psutil.Error:
        pass


def wait_for(predicate: Callable[[], T], timeout: float, what: str, poll: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        if proc.status() == psutil.STATUS_ZOMBIE:
            return []
        return proc.cmdline()
    except psutil.Error:
        return []


def run_processes(run_dir: Path) -> list[psutil.Process]:
    """Live launcher.train / torch.distributed.run processes of this run directory."""
    found = []
    key = str(run_dir)
    for proc in psutil.process_iter():
        argv = _cmdline(proc)
        if key in argv and ("launcher.train" in argv or "torch.distributed.run" in argv):
            found.append(proc)
    return found


def rank_processes(run_dir: Path) -> dict[int, psutil.Process]:
    """rank -> the training process of that rank (not torchrun itself)."""
    ranks = {}
    for proc in run_processes(run_dir):
        argv = _cmdline(proc)
        if "torch.distributed.run" in argv:
            continue
        try:
            rank = proc.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None:
            ranks[int(rank)] = proc
    return ranks


def assert_no_leftovers(run_dir: Path, within_s: float = 30) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        left = run_processes(run_dir)
        if not left:
            return
        time.sleep(0.5)
    raise AssertionError(f"processes left behind: {[(p.pid, _cmdline(p)) for p in left]}")


def complete(run_dir: Path, step: int) -> bool:
    return (run_dir / "checkpoints" / f"checkpoint-{step}" / "COMPLETE").is_file()


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_steps(run_dir: Path) -> list[int]:
    return [int(m["step"]) for m in metrics(run_dir) if m.get("loss") is not None]


def explain(result: subprocess.CompletedProcess[str]) -> str:
    return (
        f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n"
        f"--- stderr\n{result.stderr[-6000:]}"
    )


def send(pid: int, sig: signal.Signals) -> None:
    os.kill(pid, sig)
