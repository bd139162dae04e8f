"""6. On a CUDA machine, with random weights of real architectures (4's GPU part, the
planner against the measured peak, is bench_gpu_planner.py, which reuses measure()):

- throughput: LoRA and QLoRA training of a 1B-class (llama3.2-1b) and an 8B-class
  (llama3.1-8b) Llama at sequence length 2048, micro-batch 1, one GPU, through tune-launch and
  through the plain baseline script (tests/benchmarks/baseline_train.py: the same model, data,
  batch, optimizer and quantization), alternating; tokens/s, MFU and peak memory
  (torch.cuda.max_memory_allocated, logged by both).

MFU = tokens/s x FLOPs per token / the device's dense bf16 peak, with FLOPs per token
6N (full) or 4N (LoRA/QLoRA: the frozen base needs no weight gradients) plus the attention
term 6 x layers x seq x hidden x (2/3 for adapters), N the parameter count; peak 989 TFLOP/s
for an H100 / H200 (SXM). Every row also has the raw tokens/s.

Without CUDA the benchmark is skipped, saying so. `measure()` also runs on CPU with a tiny
shape: tests/benchmarks/test_bench_smoke.py exercises the harness that way, so the GPU run
is not its first run.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tests.benchmarks.common import PY, ROOT, median, run_timed

NAME = "gpu_training"
SEQ = 2048
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense, SXM
THROUGHPUT = [
    ("llama3.2-1b", "lora"),
    ("llama3.2-1b", "qlora"),
    ("llama3.1-8b", "lora"),
    ("llama3.1-8b", "qlora"),
]


def long_rows(path: Path, rows: int, words: int) -> Path:
    """Alpaca rows whose answers are longer than the sequence length: every example is
    truncated to exactly max_seq_len tokens on both sides."""
    import random

    vocab = [
        "the",
        "of",
        "and",
        "to",
        "in",
        "is",
        "was",
        "for",
        "on",
        "that",
        "with",
        "as",
        "by",
        "at",
        "from",
        "it",
        "an",
        "be",
        "this",
        "which",
    ]
    rng = random.Random(0)
    with path.open("w") as fh:
        for i in range(rows):
            text = " ".join(rng.choice(vocab) for _ in range(words))
            fh.write(json.dumps({"instruction": f"Continue {i}.", "input": "", "output": text}))
            fh.write("\n")
    return path


def write_model(arch: str, out: Path, device: str) -> Path:
    """A random model: the architecture's real dimensions on a GPU, the tiny ones on CPU."""
    from launcher.config.arch import BUILTIN
    from launcher.tiny import write_tiny

    if device == "cpu":
        return write_tiny("llama", out)
    return write_tiny("llama", out, shape=BUILTIN[arch], dtype="bfloat16", device=device)


def _steady(metrics: Path, tokens_per_step: int) -> dict[str, float]:
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    steps = {int(r["step"]): r for r in rows if r.get("loss") is not None}
    ordered = [steps[s] for s in sorted(steps)]
    steady = ordered[1:] if len(ordered) > 2 else ordered  # from the first logging step on
    first, last = steady[0], steady[-1]
    rate = (last["step"] - first["step"]) / max(last["time"] - first["time"], 1e-9)
    peaks = [r["peak_memory_gib"] for r in rows if r.get("peak_memory_gib") is not None]
    return {
        "tokens_per_s": rate * tokens_per_step,
        "peak_memory_gib": max(peaks) if peaks else float("nan"),
    }


def recipe_sets(
    model: Path,
    data: Path,
    *,
    method: str,
    gc: bool,
    steps: int,
    seq: int,
    gpu: bool,
    strategy: str = "ddp",
) -> dict[str, Any]:
    """The --set overrides of recipes/quickstart.yaml for one measured single-process run:
    micro-batch 1, every example truncated to `seq` tokens, bf16 on a GPU (fp32 on CPU),
    paged 8-bit AdamW for QLoRA on a GPU, no validation or checkpoint, serve and eval off."""
    sets: dict[str, Any] = {
        "model.name_or_path": str(model),
        "model.dtype": "bf16" if gpu else "fp32",
        "method.kind": method,
        "method.dropout": 0.0,
        "data.train": str(data),
        "data.max_seq_len": seq,
        "data.val_split": 0,
        "train.micro_batch_size": 1,
        "train.global_batch_size": 1,
        "train.max_steps": steps,
        "train.logging_steps": 5,
        # no checkpoint, only final/: a 1B full fine-tune's would be ~12 GB of disk each
        "train.save_steps": steps + 1,
        "train.min_free_disk": "warn",
        "train.learning_rate": 1e-4,
        "train.precision": "bf16" if gpu else "fp32",
        "train.gradient_checkpointing": gc,
        "train.optimizer": "paged_adamw_8bit" if method == "qlora" and gpu else "adamw_torch",
        "distributed.strategy": strategy,
        "resources.gpus_per_node": 1,
        "resources.accelerator": "gpu" if gpu else "cpu",
        "serve.enabled": False,
        "eval.enabled": False,
    }
    if not gpu:  # one thread per rank, as the baseline's: CPU runs share the cores
        sets["env.OMP_NUM_THREADS"] = '"1"'  # quoted: the recipe's env values are strings
    return sets


def tune_launch_argv(run_dir: Path, sets: dict[str, Any], *, dry_run: bool = False) -> list[str]:
    """`tune-launch run recipes/quickstart.yaml` with `sets` as --set overrides: the train
    stage only, or the dry run (the run directory's files, no process started)."""
    argv = [PY, "-m", "launcher.cli", "run", str(ROOT / "recipes/quickstart.yaml")]
    argv += ["--dry-run"] if dry_run else ["--stages", "train"]
    argv += ["--run-dir", str(run_dir)]
    for key, value in sets.items():
        argv += ["--set", f"{key}={json.dumps(value) if isinstance(value, bool) else value}"]
    return argv


def ours(
    model: Path,
    data: Path,
    out: Path,
    method: str,
    gc: bool,
    steps: int,
    seq: int,
    gpu: bool,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    sets = recipe_sets(model, data, method=method, gc=gc, steps=steps, seq=seq, gpu=gpu)
    sets |= extra or {}
    res = run_timed(tune_launch_argv(out, sets))
    assert res.returncode == 0, res.output[-3000:]
    plan = json.loads((out / "plan.json").read_text())
    return {
        **_steady(out / "metrics.jsonl", seq),
        "plan": plan["memory"],
        "on_gpu": gpu,
        "host_peak_rss_mib": round(res.peak_rss_mb, 1),  # the launcher's whole process tree
    }


def baseline(
    model: Path, data: Path, out: Path, method: str, gc: bool, steps: int, seq: int, gpu: bool
) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    argv = [PY, "-m", "accelerate.commands.launch", "--num_processes", "1"]
    argv += ["--main_process_port", "0", str(ROOT / "tests/benchmarks/baseline_train.py")]
    argv += ["--model", str(model), "--data", str(data), "--out", str(out)]
    argv += ["--max-steps", str(steps), "--micro-batch", "1", "--grad-accum", "1"]
    argv += ["--lr", "1e-4", "--max-len", str(seq), "--logging-steps", "5"]
    if gpu:
        argv += ["--gpu", "--bf16"]
        if method == "qlora":
            argv += ["--optim", "paged_adamw_8bit"]
    if method == "qlora":
        argv.append("--qlora")
    if gc:
        argv.append("--gradient-checkpointing")
    env = {} if gpu else {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    res = run_timed(argv, env=env)
    assert res.returncode == 0, res.output[-3000:]
    return _steady(out / "metrics.jsonl", seq)


def flops_per_token(shape: Any, method: str, seq: int) -> float:
    n = shape.total_params()
    attention = 6 * shape.num_layers * seq * shape.hidden_size
    if method == "full":
        return 6 * n + attention
    return 4 * n + attention * 2 / 3


def measure(
    arch: str,
    method: str,
    *,
    gc: bool,
    steps: int,
    seq: int,
    device: str,
    work: Path,
    with_baseline: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One side-by-side pair (ours, then the baseline) on a random model; `extra`: more
    recipe settings for our side (e.g. model.liger_kernel)."""
    gpu = device != "cpu"
    model = work / f"model-{arch}"
    if not (model / "config.json").is_file():
        write_model(arch, model, device)
    data = work / "long.jsonl"
    if not data.is_file():
        long_rows(data, rows=64, words=seq * 2)
    tag = f"{arch}-{method}-gc{int(gc)}" + ("-" + "-".join(map(str, extra)) if extra else "")
    row: dict[str, Any] = {"architecture": arch, "method": method, "checkpointing": gc}
    row["ours"] = ours(model, data, work / f"ours-{tag}", method, gc, steps, seq, gpu, extra)
    if with_baseline:
        row["baseline"] = baseline(model, data, work / f"base-{tag}", method, gc, steps, seq, gpu)
        row["throughput_ratio"] = row["ours"]["tokens_per_s"] / row["baseline"]["tokens_per_s"]
    return row


def skipped(name: str) -> dict[str, object] | None:
    import torch

    if torch.cuda.is_available():
        return None
    return {
        "name": name,
        "skipped": "no CUDA device on this machine: 1B/8B LoRA and QLoRA tokens/s, MFU and peak "
        "memory, and the planner against max_memory_allocated, need a GPU (docs/gpu-results.md)",
    }


def run(smoke: bool) -> dict[str, object]:
    import torch

    if reason := skipped(NAME):
        return reason
    from launcher.config.arch import BUILTIN

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    steps = 10 if smoke else 40
    rows = []
    for arch, method in THROUGHPUT[:1] if smoke else THROUGHPUT:
        reps = [
            measure(arch, method, gc=True, steps=steps, seq=SEQ, device="cuda", work=work)
            for _ in range(1 if smoke else 2)
        ]
        flops = flops_per_token(BUILTIN[arch], method, SEQ)
        ours_tps = median([r["ours"]["tokens_per_s"] for r in reps])
        base_tps = median([r["baseline"]["tokens_per_s"] for r in reps])
        rows.append(
            {
                "architecture": arch,
                "method": method,
                "ours_tokens_per_s": ours_tps,
                "baseline_tokens_per_s": base_tps,
                "throughput_ratio": ours_tps / base_tps,
                "ours_mfu": ours_tps * flops / peak if peak else None,
                "ours_peak_memory_gib": max(r["ours"]["peak_memory_gib"] for r in reps),
                "baseline_peak_memory_gib": max(r["baseline"]["peak_memory_gib"] for r in reps),
            }
        )
        shutil.rmtree(work / f"model-{arch}", ignore_errors=True)  # 16 GB for the 8B
    shutil.rmtree(work, ignore_errors=True)
    ratios = [r["throughput_ratio"] for r in rows]
    return {
        "name": NAME,
        "device": name,
        "sequence_length": SEQ,
        "throughput": rows,
        "headline": {"min_throughput_ratio": min(ratios)},
        "target": "tune-launch tokens/s >= 0.97x the baseline's; MFU and peak memory recorded",
        "met": min(ratios) >= 0.97,
        "published": "torchtune README (RTX 4090): 8B QLoRA 7.4 GiB / 2413 tok/s, "
        "8B LoRA 16.2 GiB / 3083 tok/s",
    }
