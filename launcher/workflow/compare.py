"""A sweep's comparison: per variant, read back from its run directory, what the guides
tabulate — trainable parameters, peak memory (measured, and the planner's estimate beside
it), wall time, tokens/s, final training and validation loss, every eval metric, quality per
training hour — written to SWEEP_DIR/comparison.json, comparison.md and comparison.png, the
best variant by the recipe's own eval metric marked.

The recipe's metric: the fine-tuned model's exact match when the run evaluates a generative
model through the endpoint, the validation accuracy for a classifier, otherwise the final
validation loss (lower is better).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from launcher.rundir import RunDir


def facts(run: RunDir, wall_s: float | None) -> dict[str, Any]:
    """What one variant's run directory says about it (None where it says nothing)."""
    plan = _json(run.plan_file) or {}
    memory = plan.get("memory") or {}
    trained = _json(run.train_facts_file) or {}
    records = run.metrics()
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    eval_losses = [r["eval_loss"] for r in records if r.get("eval_loss") is not None]
    rates = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    times = [r["time"] for r in records if r.get("time") and r.get("loss") is not None]
    gpu = [r["peak_memory_gib"] for r in records if r.get("peak_memory_gib") is not None]
    rss = [r["peak_rss_gib"] for r in records if r.get("peak_rss_gib") is not None]
    train_s = times[-1] - times[0] if len(times) > 1 else None
    out: dict[str, Any] = {
        "trainable_params": trained.get("trainable_params"),
        "trainable_params_planned": memory.get("trainable_params"),
        "total_params": trained.get("total_params"),
        "peak_memory_gib": max(gpu) if gpu else (max(rss) if rss else None),
        "peak_memory_measured": "GPU allocated, rank 0" if gpu else "host RSS, rank 0",
        "peak_memory_planned_gib": memory.get("per_gpu_gib"),
        "wall_s": round(wall_s, 1) if wall_s is not None else None,
        "train_s": round(train_s, 1) if train_s is not None else None,
        "tokens_per_s": round(sum(rates) / len(rates), 1) if rates else None,
        "final_loss": losses[-1] if losses else None,
        "final_eval_loss": eval_losses[-1] if eval_losses else None,
        "eval": _eval_metrics(run),
    }
    out["metric"], out["metric_name"], out["higher_is_better"] = _metric(out)
    hours = (train_s or 0) / 3600
    better = out["higher_is_better"]
    out["quality_per_train_hour"] = (
        round(out["metric"] / hours, 3) if better and out["metric"] is not None and hours else None
    )
    return out


def _json(path: Path) -> dict[str, Any] | None:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _eval_metrics(run: RunDir) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    results = _json(run.eval_results)
    if results:
        for variant, values in (results.get("metrics") or {}).items():
            for key, value in (values or {}).items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    metrics[f"{variant}.{key}"] = value
    classification = _json(run.classification_eval_file)
    if classification:
        metrics |= {k: v for k, v in classification.items() if isinstance(v, int | float)}
    return metrics


def _metric(row: dict[str, Any]) -> tuple[float | None, str, bool]:
    ev = row["eval"]
    if "finetuned.exact_match" in ev:
        return ev["finetuned.exact_match"], "exact match (fine-tuned)", True
    if "eval_accuracy" in ev:
        return ev["eval_accuracy"], "validation accuracy", True
    return row["final_eval_loss"], "validation loss", False


def best(rows: dict[str, dict[str, Any]]) -> str | None:
    scored = {n: r for n, r in rows.items() if r.get("metric") is not None}
    if not scored:
        return None
    higher = next(iter(scored.values()))["higher_is_better"]
    return (max if higher else min)(scored, key=lambda n: scored[n]["metric"])


def write(sweep_dir: Path, entries: list[dict[str, Any]]) -> dict[str, Path]:
    """entries: [{"name", "overrides", "same_as", "state", "wall_s"}] in grid order."""
    rows = {}
    for entry in entries:
        row = facts(RunDir(sweep_dir / entry["name"]), entry.get("wall_s"))
        rows[entry["name"]] = {
            **{k: entry.get(k) for k in ("overrides", "same_as", "state")},
            **row,
        }
    winner = best({n: r for n, r in rows.items() if r["state"] == "done"})
    doc = {"best": winner, "variants": rows}
    paths = {
        "json": sweep_dir / "comparison.json",
        "md": sweep_dir / "comparison.md",
        "png": sweep_dir / "comparison.png",
    }
    RunDir.write_atomic(paths["json"], json.dumps(doc, indent=2) + "\n")
    RunDir.write_atomic(paths["md"], markdown(doc))
    plot(doc, paths["png"])
    return paths


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown(doc: dict[str, Any]) -> str:
    rows = doc["variants"]
    metric = next((r["metric_name"] for r in rows.values() if r.get("metric_name")), "metric")
    head = [
        "variant", "state", "trainable params", "peak memory GiB (planned)", "wall s",
        "train s", "tokens/s", "final loss", "final eval loss", metric, "per train hour",
    ]  # fmt: skip
    lines = [
        "# Sweep comparison",
        "",
        f"Best by {metric}: **{doc['best'] or 'none'}**. Peak memory is measured "
        "(GPU allocated on a GPU, host RSS of rank 0 on a CPU) with the planner's per-GPU "
        "estimate in brackets; train s runs from the first to the last logged step.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, r in rows.items():
        mark = " **(best)**" if name == doc["best"] else ""
        memory = f"{_cell(r['peak_memory_gib'])} ({_cell(r['peak_memory_planned_gib'])})"
        cells = [
            f"`{name}`{mark}", r["state"], _cell(r["trainable_params"]), memory,
            _cell(r["wall_s"]), _cell(r["train_s"]), _cell(r["tokens_per_s"]),
            _cell(r["final_loss"]), _cell(r["final_eval_loss"]), _cell(r["metric"]),
            _cell(r["quality_per_train_hour"]),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Overrides per variant (and grid combinations that train the same thing):", ""]
    for name, r in rows.items():
        same = f" (same as: {', '.join(r['same_as'])})" if r.get("same_as") else ""
        lines.append(f"- `{name}`: `{' '.join(r['overrides'] or []) or '(the recipe)'}`{same}")
    lines += ["", "Every eval metric per variant is in comparison.json.", ""]
    return "\n".join(lines)


def plot(doc: dict[str, Any], out: Path) -> None:
    """Bars per variant: final loss, the recipe's metric, peak memory, wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["variants"]
    names = list(rows)
    panels = [
        ("final_loss", "final training loss"),
        ("metric", next((r["metric_name"] for r in rows.values()), "metric")),
        ("peak_memory_gib", "peak memory (GiB)"),
        ("wall_s", "wall time (s)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5))
    for ax, (key, title) in zip(axes, panels, strict=True):
        values = [rows[n].get(key) or 0.0 for n in names]
        colors = ["tab:green" if n == doc["best"] else "tab:blue" for n in names]
        ax.bar(range(len(names)), values, color=colors)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
