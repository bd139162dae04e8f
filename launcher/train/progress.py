"""One progress line per logging step, written once for every place that shows it: rank 0's
terminal and log (launcher/train/callbacks.py), `--wait` and `tune-launch logs --follow` on
SLURM (cluster/chain.py), which read the same records back from metrics.jsonl.

    step 40/300 (13%) | loss 1.234 | lr 4.90e-03 | 5.1k tok/s | 0:00:12 elapsed, ETA 0:01:18 | peak 1.20 GiB GPU
    eval at step 100: eval_loss 0.8123

Torch-free: the submitting host imports it.
"""

from __future__ import annotations

from typing import Any


def clock(seconds: float | None) -> str:
    """0:01:05 for 65 s; "?" when unknown."""
    if seconds is None or seconds < 0:
        return "?"
    total = round(seconds)
    return f"{total // 3600}:{total // 60 % 60:02d}:{total % 60:02d}"


def _rate(value: float) -> str:
    return f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.0f}"


def progress_line(record: dict[str, Any]) -> str | None:
    """The line for one metrics.jsonl record (None for a record that is neither a training
    nor an evaluation log)."""
    step = record.get("step")
    if record.get("eval_loss") is not None and record.get("loss") is None:
        return f"eval at step {step}: eval_loss {float(record['eval_loss']):.4f}"
    if record.get("loss") is None:
        return None
    total = record.get("total_steps")
    head = f"step {step}/{total}" if total else f"step {step}"
    if total and step is not None:
        head += f" ({100 * int(step) / int(total):.0f}%)"
    parts = [head, f"loss {float(record['loss']):.4f}"]
    if record.get("learning_rate") is not None:
        parts.append(f"lr {float(record['learning_rate']):.2e}")
    if record.get("tokens_per_s"):
        parts.append(f"{_rate(float(record['tokens_per_s']))} tok/s")
    if record.get("elapsed_s") is not None:
        parts.append(f"{clock(record['elapsed_s'])} elapsed, ETA {clock(record.get('eta_s'))}")
    if record.get("peak_memory_gib") is not None:  # the GPU's
        parts.append(f"peak {float(record['peak_memory_gib']):.2f} GiB GPU")
    elif record.get("peak_rss_gib") is not None:  # rank 0's host memory (CPU runs)
        parts.append(f"peak {float(record['peak_rss_gib']):.2f} GiB RSS")
    return " | ".join(parts)
