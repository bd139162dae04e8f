"""What the parts of scripts/gpu_check.sh share: the context (output and work folders, the
mode, the shapes), the per-part JSON report written after every check, and tune-launch runs.

A part is a list of checks. Each check ends as `measured` (its figures), `skipped` (with the
reason: on a CPU host, the CUDA it needs) or `failed` (the error and the end of the output);
the report is rewritten after each one, so a part stopped by its time box keeps what it had.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.benchmarks.bench_gpu import _steady, long_rows, tune_launch_argv  # noqa: E402
from tests.benchmarks.common import run_timed  # noqa: E402

TINY_SEQ = 128  # the tiny model's runs (FSDP, ZeRO): its max_position_embeddings is 512
H200_MEASURED_BF16 = 790e12  # an 8192^3 bf16 matmul on this workplace's H200 (KINDS.md)


class Skip(Exception):
    """Raised by a check that cannot run here; the message is the reason."""


def no_cuda(what: str) -> Skip:
    return Skip(f"no CUDA device here (CPU host or --cpu-smoke): {what} needs one")


@dataclass(frozen=True)
class Context:
    out: Path  # the part's JSON goes here (the log is the shell's redirect, beside it)
    work: Path  # models, data, run directories: large, never under `out`
    smoke: bool  # --cpu-smoke: tiny shapes, a few steps

    @property
    def cuda(self) -> bool:
        import torch

        return torch.cuda.is_available()

    @property
    def mode(self) -> str:
        return "cpu-smoke" if self.smoke else ("gpu" if self.cuda else "cpu")

    @property
    def device_name(self) -> str:
        import torch

        return torch.cuda.get_device_name() if self.cuda else "cpu"

    @property
    def seq(self) -> int:
        """Sequence length of the 1B / 8B measurements (the tiny shape's on CPU)."""
        return 2048 if self.cuda else 64

    @property
    def tiny_model(self) -> Path:
        return self.work / "model-tiny"

    @property
    def tiny_data(self) -> Path:
        return self.work / f"long-{TINY_SEQ}.jsonl"

    def model(self, arch: str) -> Path:
        """Where bench_gpu.measure() finds (or writes) the random model of `arch`."""
        return self.work / f"model-{arch}"


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    tmp.replace(path)


def tail(text: str, n: int = 3000) -> str:
    return text[-n:]


class Report:
    """One part's JSON file (OUT/<part>.json), rewritten after every check."""

    def __init__(self, ctx: Context, part: str, *, measures: str, target: str = "") -> None:
        self.path = ctx.out / f"{part}.json"
        self.doc: dict[str, Any] = {
            "part": part,
            "mode": ctx.mode,
            "device": ctx.device_name,
            "started": now(),
            "measures": measures,
            "target": target,
            "checks": [],
            "notes": [],
        }
        self.write()

    def write(self) -> None:
        checks = self.doc["checks"]
        self.doc["status"] = "failed" if any(c["status"] == "failed" for c in checks) else "ok"
        write_json(self.path, self.doc)

    def note(self, text: str) -> None:
        self.doc["notes"].append(text)
        self.write()

    def check(self, name: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run one check and record its outcome; never raises."""
        print(f"== {self.doc['part']}: {name}", flush=True)
        start = time.perf_counter()
        entry: dict[str, Any] = {"name": name}
        try:
            entry |= {"status": "measured", **run()}
        except Skip as exc:
            entry |= {"status": "skipped", "reason": str(exc)}
        except Exception as exc:
            traceback.print_exc()
            entry |= {"status": "failed", "error": tail(f"{type(exc).__name__}: {exc}")}
        entry["wall_s"] = round(time.perf_counter() - start, 1)
        print(json.dumps(entry, default=str)[:2000], flush=True)
        self.doc["checks"].append(entry)
        self.write()
        return entry

    def finish(self, **headline: Any) -> None:
        self.doc["headline"] = headline
        self.doc["finished"] = now()
        self.write()


def tiny_sets(ctx: Context, *, method: str, strategy: str, gc: bool = False) -> dict[str, Any]:
    """Overrides for a short run on the tiny Llama (the FSDP and ZeRO checks): 10 steps of
    TINY_SEQ tokens, bf16 on a GPU, paged 8-bit AdamW for QLoRA (it falls back to plain
    8-bit on CPU)."""
    from tests.benchmarks.bench_gpu import recipe_sets

    sets = recipe_sets(
        ctx.tiny_model,
        ctx.tiny_data,
        method=method,
        gc=gc,
        steps=10,
        seq=TINY_SEQ,
        gpu=ctx.cuda,
        strategy=strategy,
    )
    if method == "qlora":
        sets["train.optimizer"] = "paged_adamw_8bit"
    return sets


def launch(
    run_dir: Path, sets: dict[str, Any], *, dry_run: bool = False, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """tune-launch with `sets` into run_dir; raises with the end of its output on failure.
    Returns the run's figures: steady tokens/s, peak GPU memory, plan memory, host RSS."""
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    res = run_timed(tune_launch_argv(run_dir, sets, dry_run=dry_run), env=env, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"tune-launch exited {res.returncode}:\n{tail(res.output)}")
    figures: dict[str, Any] = {"wall_s_run": round(res.seconds, 1)}
    if not dry_run:
        seq = int(sets["data.max_seq_len"])
        figures |= _steady(run_dir / "metrics.jsonl", seq)
        figures["host_peak_rss_mib"] = round(res.peak_rss_mb, 1)
        figures["final_written"] = (run_dir / "final").is_dir()
    return figures


def prepare_tiny(ctx: Context) -> None:
    """The tiny Llama and its data, written once before the parts start."""
    from launcher.tiny import write_tiny

    if not (ctx.tiny_model / "config.json").is_file():
        tmp = ctx.tiny_model.with_name("model-tiny.tmp")
        write_tiny("llama", tmp)
        tmp.replace(ctx.tiny_model)
    if not ctx.tiny_data.is_file():
        long_rows(ctx.tiny_data, rows=64, words=TINY_SEQ * 2)
