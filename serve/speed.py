"""Serving speed, measured on the eval's own requests (serve/scoring.py streams them).

For one variant's rows: output tokens per second at the eval's concurrency (the server's
completion-token counts over the wall time from the first request sent to the last answer
received), time to the first streamed token and request latency, p50 and p95 (nearest rank).
"""

from __future__ import annotations

import math
from typing import Any


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of `values`; None for none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def serving_speed(
    rows: list[dict[str, Any]], concurrency: int, shared_with: list[str] | None = None
) -> dict[str, Any] | None:
    """Speed of one variant from its prediction rows; None when the rows carry no timings
    (in-process generation). `shared_with` names variants answered by the same server at
    the same time (their requests competed with these)."""
    timed = [r for r in rows if r.get("error") is None and r.get("end_s") is not None]
    if not timed:
        return None
    wall = max(r["end_s"] for r in timed) - min(r["start_s"] for r in timed)
    counts = [r.get("completion_tokens") for r in timed]
    tokens = sum(c for c in counts if c is not None)
    ttft = [r["ttft_s"] for r in timed if r.get("ttft_s") is not None]
    latency = [r["latency_s"] for r in timed]
    return {
        "requests": len(timed),
        "concurrency": concurrency,
        "output_tokens": tokens if all(c is not None for c in counts) else None,
        "wall_s": round(wall, 4),
        "output_tokens_per_s": round(tokens / wall, 2) if wall > 0 and tokens else None,
        "requests_per_s": round(len(timed) / wall, 2) if wall > 0 else None,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "latency_p50_s": percentile(latency, 50),
        "latency_p95_s": percentile(latency, 95),
        "shared_server_with": shared_with or [],
    }
