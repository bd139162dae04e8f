"""The steps of scripts/gpu_check.sh, one process each (the shell time-boxes every one):

    gpu_check.py env|prepare|prepare-8b|planner|throughput|fsdp|qlora|summary \
        --out OUT --work WORK [--smoke] [--rc STEP=CODE ...] [--box STEP=SECONDS ...]

- env: versions (and where each package was imported from: the carried wheels or the
  machine's), an import check of everything the parts need, the GPU, nvidia-smi, nvcc, and
  an 8192^3 bf16 matmul's TFLOP/s (the ceiling MFU is read against) -> WORK/env.json.
- prepare: the tiny Llama, the llama3.2-1b random model (the tiny one on CPU), their data;
  prepare-8b: the llama3.1-8b random model (GPU only), written while parts 1, 3, 4 run.
- planner, throughput, fsdp, qlora: the four parts (scripts/gpu_<part>.py), each writing
  OUT/<part>.json after every check.
- summary: OUT/summary.json (env, each part's outcome and exit code, the goals), the logs
  packed into OUT/logs.tar.gz. OUT then holds six files: the device tool returns at most 8.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from gpu_common import Context, now, prepare_tiny, tail, write_json

from launcher.plan_files import PACKAGES as RUN_PACKAGES
from launcher.plan_files import versions as run_versions

PARTS = ("planner", "throughput", "fsdp", "qlora")
# what a run records, and what the GPU machine may hold in another version or not at all
PACKAGES = (*RUN_PACKAGES, "safetensors", "tokenizers", "triton", "liger-kernel")
# vLLM is not carried to the GPU machine (serving is not measured there)
IMPORTS = (*(p for p in RUN_PACKAGES if not p.startswith("vllm")), "launcher.train.entry")
TIMED_OUT = (124, 137)  # timeout's TERM, then KILL


def versions() -> dict[str, Any]:
    """Each package's version and the folder it is imported from (the carried wheels in
    /tmp/site, or the machine's own)."""
    from importlib import metadata

    found: dict[str, Any] = {}
    for name in PACKAGES:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            found[name] = None
            continue
        found[name] = {"version": dist.version, "from": str(dist.locate_file(""))}
    return found


def import_check() -> dict[str, str]:
    seen = {}
    for name in IMPORTS:
        try:
            importlib.import_module(name)
            seen[name] = "ok"
        except Exception as exc:
            seen[name] = f"{type(exc).__name__}: {exc}"[:500]
    return seen


def command(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"not available: {exc}"
    return (proc.stdout + proc.stderr).strip()


def matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return round(2 * n**3 * reps / (time.perf_counter() - start) / 1e12, 1)


def gpu_facts() -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {"cuda_available": torch.cuda.is_available()}
    if not torch.cuda.is_available():
        return facts
    props = torch.cuda.get_device_properties(0)
    return facts | {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "torch_cuda": torch.version.cuda,
        "bf16_matmul_tflops_8192": matmul_tflops(),
        "nvcc": command(["nvcc", "--version"]).splitlines()[-1:],
        "nvidia_smi": command(["nvidia-smi"]),
    }


def env(ctx: Context) -> None:
    import platform

    doc = {
        "date": now(),
        "mode": ctx.mode,
        "python": f"{platform.python_version()} ({sys.executable})",
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "git_commit": run_versions()["git_sha"],
        "versions": versions(),
        "imports": import_check(),
        "gpu": gpu_facts(),
    }
    write_json(ctx.work / "env.json", doc)
    print(json.dumps(doc, indent=2, default=str))


def prepare(ctx: Context, arch: str) -> None:
    """The random model of `arch` (the tiny shape on CPU) and the data bench_gpu.measure
    reads, written once: the parts running side by side must not race to write them."""
    from tests.benchmarks.bench_gpu import long_rows, write_model

    if arch == "llama3.2-1b":
        prepare_tiny(ctx)
        data = ctx.work / "long.jsonl"  # bench_gpu.measure's name
        if not data.is_file():
            long_rows(data, rows=64, words=ctx.seq * 2)
    elif not ctx.cuda:
        print(f"{arch}: not built without CUDA (the throughput part skips its rows)")
        return
    model = ctx.model(arch)
    if (model / "config.json").is_file():
        return
    start = time.perf_counter()
    tmp = model.with_name(model.name + ".tmp")
    write_model(arch, tmp, "cuda" if ctx.cuda else "cpu")
    tmp.replace(model)
    print(f"wrote {model} in {time.perf_counter() - start:.0f} s")


def part_outcome(ctx: Context, part: str, rc: int | None, box: str | None) -> dict[str, Any]:
    """The part's JSON as it ended (rewritten with the reason when the process did not end
    cleanly), and its line in the summary."""
    path, log = ctx.out / f"{part}.json", ctx.out / f"{part}.log"
    doc = json.loads(path.read_text()) if path.is_file() else None
    if doc is None:
        doc = {"part": part, "status": "failed", "checks": []}
    if rc in TIMED_OUT:
        doc["status"] = "timed out"
        doc["error"] = f"stopped by its time box ({box} s); the checks listed had ended"
    elif rc not in (0, None):
        doc["status"] = "failed"
        doc.setdefault("error", f"exit code {rc}")
    if doc["status"] != "ok" and log.is_file():
        doc["log_tail"] = tail(log.read_text(errors="replace"), 2000)
    if rc not in (0, None) or not path.is_file():
        write_json(path, doc)
    return {
        "status": doc["status"],
        "exit_code": rc,
        "time_box_s": box,
        "checks": {c["name"]: c["status"] for c in doc["checks"]},
        "headline": doc.get("headline"),
    }


def pack_logs(ctx: Context) -> Path:
    """Every log (the parts', the steps', each run's rank logs) into OUT/logs.tar.gz; the
    parts' logs then leave OUT, which keeps six files."""
    out = ctx.out / "logs.tar.gz"
    found = [*ctx.out.glob("*.log"), *ctx.work.glob("*.log"), *ctx.work.glob("*.json")]
    for pattern in ("*/logs/*.log", "*/logs/*.error", "*/request.txt"):
        found += ctx.work.glob(pattern)
    with tarfile.open(out, "w:gz") as tar:
        for path in sorted(found):
            base = ctx.out if path.is_relative_to(ctx.out) else ctx.work
            tar.add(path, arcname=f"logs/{path.relative_to(base)}")
    for path in ctx.out.glob("*.log"):
        path.unlink()
    return out


def summary(ctx: Context, rcs: dict[str, int], boxes: dict[str, str], extra: dict[str, Any]) -> int:
    env_file = ctx.work / "env.json"
    parts = {p: part_outcome(ctx, p, rcs.get(p), boxes.get(p)) for p in PARTS if p in rcs}
    steps = {k: v for k, v in rcs.items() if k not in PARTS}
    planner = (parts.get("planner") or {}).get("headline") or {}
    speed = (parts.get("throughput") or {}).get("headline") or {}
    doc = {
        "finished": now(),
        **extra,
        "steps_exit_codes": steps,
        "goals": {
            "planner_within_10pct": {
                "worst_error_pct": planner.get("worst_error_pct"),
                "met": planner.get("met"),
            },
            "mfu_8b_lora_seq2048_ge_45pct": {
                "mfu": speed.get("mfu_8b_lora"),
                "met": speed.get("met"),
            },
        },
        "parts": parts,
        "env": json.loads(env_file.read_text()) if env_file.is_file() else None,
    }
    write_json(ctx.out / "summary.json", doc)
    pack_logs(ctx)
    print(f"gpu check ({ctx.mode}): {ctx.out}/summary.json")
    for name, part in parts.items():
        print(f"  {name:<11} {part['status']:<9} {json.dumps(part['checks'])}")
        if part["headline"]:
            print(f"  {'':<11} {json.dumps(part['headline'], default=str)}")
    print(f"  goals: {json.dumps(doc['goals'])}")
    return 0 if all(p["status"] == "ok" for p in parts.values()) else 1


def pairs(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["env", "prepare", "prepare-8b", *PARTS, "summary"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--rc", action="append", default=[], metavar="STEP=CODE")
    p.add_argument("--box", action="append", default=[], metavar="STEP=SECONDS")
    p.add_argument("--info", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    ctx = Context(out=args.out.resolve(), work=args.work.resolve(), smoke=args.smoke)
    if args.step == "env":
        env(ctx)
    elif args.step == "prepare":
        prepare(ctx, "llama3.2-1b")
    elif args.step == "prepare-8b":
        prepare(ctx, "llama3.1-8b")
    elif args.step == "summary":
        rcs = {k: int(v) for k, v in pairs(args.rc).items()}
        return summary(ctx, rcs, pairs(args.box), pairs(args.info))
    else:
        importlib.import_module(f"gpu_{args.step}").run(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
