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
    "resume_reshard",
    "data_preparation",
    "eval_throughput",
    "gpu_training",
    "gpu_planner",
}
GPU_ONLY = {"gpu_training", "gpu_planner"}


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
    import torch

    for name, result in results.items():
        if name in GPU_ONLY and not torch.cuda.is_available():
            assert "no CUDA device" in result["skipped"], (name, result)  # says why
            continue
        assert "skipped" not in result, (name, result)
        assert "target" in result and "met" in result, (name, result)
    assert results["planner_accuracy"]["met"] is True  # exact counts: not a timing
    assert results["resume_reshard"]["met"] is True  # every parameter converted whole


@pytest.mark.bench
@pytest.mark.train
# LoRA without checkpointing runs in test_gpu_check's throughput smoke; QLoRA with it here
@pytest.mark.parametrize("method,checkpointing", [("qlora", True)])
def test_gpu_benchmark_harness_runs_on_cpu(
    tmp_path: Path, method: str, checkpointing: bool
) -> None:
    """bench_gpu's pair (tune-launch, then the baseline script with the same quantization,
    checkpointing and sequence length) on CPU with the tiny shape: the GPU run is not the
    harness's first run. Asserts what the GPU tables are built from."""
    from tests.benchmarks.bench_gpu import measure
    from tests.benchmarks.bench_gpu_planner import compare

    row = measure(
        "llama3.2-1b", method, gc=checkpointing, steps=10, seq=64, device="cpu", work=tmp_path
    )
    for side in ("ours", "baseline"):
        assert row[side]["tokens_per_s"] > 0, row
    assert 0.2 < row["throughput_ratio"] < 5, row
    # every example is truncated to exactly the sequence length on both sides
    plan = row["ours"]["plan"]
    assert plan["per_gpu_gib"] > 0 and plan["breakdown_gib"]["runtime"] == 0.0
    seen = [
        json.loads(x)
        for x in (tmp_path / f"ours-llama3.2-1b-{method}-gc{int(checkpointing)}/metrics.jsonl")
        .read_text()
        .splitlines()
    ]
    tokens = [r["num_input_tokens_seen"] for r in seen if r.get("num_input_tokens_seen")]
    assert tokens[-1] == 10 * 64, tokens
    # no CUDA, so no measured peak: check compare()'s arithmetic against a stand-in of 1 GiB
    row["ours"]["peak_memory_gib"] = 1.0
    assert compare(row)["error"] == round(plan["per_gpu_gib"] - 1.0, 3)
