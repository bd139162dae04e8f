"""Part 1 of scripts/gpu_check.sh: the memory planner against torch.cuda.max_memory_allocated().

For the llama3.2-1b shape (random weights, sdpa, micro-batch 1, sequence 2048, one GPU):
full, LoRA and QLoRA, gradient checkpointing off and on. Each case is one tune-launch run
(bench_gpu.measure without the baseline); its plan.json holds the estimate and rank 0's
metrics.jsonl the peak `max_memory_allocated`. The error is estimate / measured - 1, the
estimate less the plan's 1 GiB CUDA-context allowance (max_memory_allocated does not count
the context). Memory is per process, so two cases run side by side on the one GPU.

On CPU (--cpu-smoke) two cases run on the tiny shape: the estimate and the host peak RSS
of the run are real, the comparison with max_memory_allocated is skipped (no CUDA).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gpu_common import Context, Report, no_cuda

from tests.benchmarks.bench_gpu import measure
from tests.benchmarks.bench_gpu_planner import compare

ARCH = "llama3.2-1b"
CASES = [(method, gc) for method in ("full", "lora", "qlora") for gc in (False, True)]
SMOKE_CASES = [("full", False), ("qlora", True)]
GOAL = 0.10


MEASURES = (
    "the planner's per-GPU estimate against torch.cuda.max_memory_allocated(), "
    f"{ARCH} shape, full / LoRA / QLoRA x gradient checkpointing off / on, sdpa, seq 2048"
)
TARGET = f"every estimate within {GOAL:.0%} of the measured peak"


def case(ctx: Context, method: str, gc: bool) -> dict[str, Any]:
    row = measure(
        ARCH,
        method,
        gc=gc,
        steps=10,
        seq=ctx.seq,
        device="cuda" if ctx.cuda else "cpu",
        work=ctx.work,
        with_baseline=False,
    )
    ours = row["ours"]
    figures: dict[str, Any] = {
        "shape": ARCH if ctx.cuda else f"tiny llama (stand-in for {ARCH})",
        "method": method,
        "checkpointing": gc,
        "attention": "sdpa",
        "sequence_length": ctx.seq,
        "plan_per_gpu_gib": ours["plan"]["per_gpu_gib"],
        "plan_breakdown_gib": ours["plan"]["breakdown_gib"],
        "tokens_per_s": round(ours["tokens_per_s"], 1),
        "host_peak_rss_mib": ours["host_peak_rss_mib"],
    }
    if not ctx.cuda:
        figures["gpu_comparison"] = f"skipped: {no_cuda('max_memory_allocated')}"
        return figures
    compared = compare(row)
    figures |= {
        "planner_gib": compared["planner_gib"],
        "measured_gib": compared["measured_gib"],
        "error_pct": round(100 * compared["error"], 1),
        "within_goal": abs(compared["error"]) <= GOAL,
    }
    return figures


def run(ctx: Context) -> None:
    report = Report(ctx, "planner", measures=MEASURES, target=TARGET)
    cases = CASES if ctx.cuda else SMOKE_CASES
    with ThreadPoolExecutor(max_workers=2 if ctx.cuda else 1) as pool:
        futures = [pool.submit(case, ctx, method, gc) for method, gc in cases]
        for (method, gc), future in zip(cases, futures, strict=True):
            report.check(f"{method} gc={'on' if gc else 'off'}", future.result)
    errors = [c["error_pct"] for c in report.doc["checks"] if "error_pct" in c]
    worst = max(errors, key=abs) if errors else None
    report.finish(
        worst_error_pct=worst,
        goal_pct=100 * GOAL,
        met=None if worst is None else abs(worst) <= 100 * GOAL,
    )
