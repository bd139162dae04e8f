"""The benchmark suite's smoke run (one repetition, smallest sizes) so the scripts don't rot.

It asserts that every benchmark runs and reports its figures, not the timings: those are
measured by `make bench` and published in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = {
    "planning_latency",
    "planner_accuracy",
    "training_overhead",
    "merge_memory",
    "eval_throughput",
}


@pytest.mark.bench
@pytest.mark.train
@pytest.mark.vllm
def test_benchmark_suite_smoke(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests/benchmarks/run_all.py"),
            "--smoke",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "benchmarks-smoke.json").read_text())
    results = {r["name"]: r for r in doc["results"]}
    assert set(results) == EXPECTED, results.keys()
    for name, result in results.items():
        assert "skipped" not in result, (name, result)
        assert "target" in result and "met" in result, (name, result)
    assert results["planner_accuracy"]["met"] is True  # exact counts: not a timing
