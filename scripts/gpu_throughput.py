"""Part 2 of scripts/gpu_check.sh: training throughput, tune-launch against the plain baseline.

LoRA and QLoRA on the llama3.2-1b and llama3.1-8b shapes (random weights), sequence 2048,
micro-batch 1, one GPU, gradient checkpointing off (the H200 holds the activations), sdpa;
QLoRA with paged 8-bit AdamW on both sides. Each row is one pair run back to back, tune-launch
then tests/benchmarks/baseline_train.py (bench_gpu.measure: the same model, data, batch,
optimizer and quantization): tokens/s from the logged step times after the first logging
step, MFU and peak max_memory_allocated.

MFU = tokens/s x FLOPs per token / the dense bf16 peak (bench_gpu.flops_per_token: 4N plus
attention for adapters, which need no weight gradients), against the datasheet's 989 TFLOP/s
and, beside it, against the ~790 TFLOP/s an 8192^3 bf16 matmul reached on this workplace's
H200 (summary.json's env has the figure measured in the same run).

The rows run in order of what they prove, the goal's row first (8B LoRA); a part stopped by
its time box keeps the rows it finished. On CPU (--cpu-smoke) the 1B rows run on the tiny
shape (tokens/s real, MFU skipped) and the 8B rows are skipped.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from gpu_common import H200_MEASURED_BF16, Context, Report, no_cuda

from launcher.config.arch import BUILTIN
from tests.benchmarks.bench_gpu import PEAK_BF16, flops_per_token, measure

ROWS = [
    ("llama3.1-8b", "lora"),
    ("llama3.2-1b", "lora"),
    ("llama3.2-1b", "qlora"),
    ("llama3.1-8b", "qlora"),
]
GOAL_MFU = 0.45
LIGER_NOTE = (
    "Liger kernels: the last row runs the 8B LoRA row again with model.liger_kernel=true "
    "(transformers' use_liger_kernel; liger-kernel comes from .whl/, fetched by "
    "scripts/fetch-wheels.sh); its tokens/s and peak memory beside the row without."
)


MEASURES = (
    "tokens/s, MFU and peak memory, tune-launch vs the plain baseline, LoRA and "
    "QLoRA, llama3.2-1b and llama3.1-8b shapes, seq 2048, micro-batch 1, one GPU"
)
TARGET = f"8B LoRA: MFU >= {GOAL_MFU:.0%} on one H200; tune-launch >= 0.97x the baseline's tokens/s"


def pair(ctx: Context, arch: str, method: str) -> dict[str, Any]:
    if arch == "llama3.1-8b" and not ctx.cuda:
        raise no_cuda("the 8B shape (16 GB of bf16 weights)")
    seq = ctx.seq
    row = measure(
        arch,
        method,
        gc=False,
        steps=30 if ctx.cuda else 10,
        seq=seq,
        device="cuda" if ctx.cuda else "cpu",
        work=ctx.work,
    )
    ours, base = row["ours"], row["baseline"]
    figures: dict[str, Any] = {
        "shape": arch if ctx.cuda else f"tiny llama (stand-in for {arch})",
        "method": method,
        "checkpointing": False,
        "sequence_length": seq,
        "ours_tokens_per_s": round(ours["tokens_per_s"], 1),
        "baseline_tokens_per_s": round(base["tokens_per_s"], 1),
        "throughput_ratio": round(row["throughput_ratio"], 3),
    }
    if not ctx.cuda:
        figures["host_peak_rss_mib"] = ours["host_peak_rss_mib"]
        figures["mfu"] = f"skipped: {no_cuda('MFU against a bf16 peak')}"
        return figures
    import torch

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    flops = flops_per_token(BUILTIN[arch], method, seq)
    figures |= {
        "ours_peak_memory_gib": ours["peak_memory_gib"],
        "baseline_peak_memory_gib": base["peak_memory_gib"],
        "flops_per_token": flops,
        "ours_mfu": round(ours["tokens_per_s"] * flops / peak, 4) if peak else None,
        "baseline_mfu": round(base["tokens_per_s"] * flops / peak, 4) if peak else None,
        "ours_mfu_vs_measured_matmul": round(ours["tokens_per_s"] * flops / H200_MEASURED_BF16, 4),
    }
    return figures


def liger_row(ctx: Context) -> dict[str, Any]:
    """The 8B LoRA row with Liger's kernels (tune-launch only: the baseline has none)."""
    if not ctx.cuda:
        raise no_cuda("Liger's Triton kernels")
    row = measure(
        "llama3.1-8b",
        "lora",
        gc=False,
        steps=30,
        seq=ctx.seq,
        device="cuda",
        work=ctx.work,
        with_baseline=False,
        extra={"model.liger_kernel": True},
    )
    ours = row["ours"]
    return {
        "ours_tokens_per_s": round(ours["tokens_per_s"], 1),
        "ours_peak_memory_gib": ours["peak_memory_gib"],
        "compare_with": "the llama3.1-8b lora row (the same run without Liger)",
    }


def run(ctx: Context) -> None:
    report = Report(ctx, "throughput", measures=MEASURES, target=TARGET)
    report.note(LIGER_NOTE)
    for arch, method in ROWS:
        report.check(f"{arch} {method}", partial(pair, ctx, arch, method))
    report.check("llama3.1-8b lora liger", partial(liger_row, ctx))
    rows = [c for c in report.doc["checks"] if c["status"] == "measured"]
    goal_row = next((c for c in rows if c["name"] == "llama3.1-8b lora"), None)
    mfu = goal_row.get("ours_mfu") if goal_row else None
    ratios = [c["throughput_ratio"] for c in rows]
    report.finish(
        mfu_8b_lora=mfu,
        goal_mfu=GOAL_MFU,
        met=None if mfu is None else mfu >= GOAL_MFU,
        min_throughput_ratio=min(ratios) if ratios else None,
        liger=next((c for c in rows if c["name"] == "llama3.1-8b lora liger"), None),
    )
