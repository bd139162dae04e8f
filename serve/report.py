"""The evaluation report: RUN_DIR/eval/results.json, report.md and PNG plots.

report.md is rendered from the results dict alone (the same numbers as results.json, at
4 decimals), so the two cannot disagree. Plots use matplotlib's Agg canvas directly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from launcher.rundir import RunDir

log = logging.getLogger(__name__)

LABELS = {
    "finetuned": "fine-tuned",
    "base": "base",
    "base_few_shot": "base few-shot",
}
COLUMNS = ("examples", "exact_match", "accuracy", "perplexity", "stopped_at_eos", "errors")
SAMPLE_ROWS = 10


def fmt(value: Any) -> str:
    """One table cell: 4 decimals for floats, '-' for a missing number."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _sci(value: float | None) -> str:
    """A small difference at 2 significant digits (1.2e-07), '-' for none."""
    return "-" if value is None else f"{value:.2g}"


def _cell(text: Any, limit: int = 60) -> str:
    text = "" if text is None else str(text)
    text = text.replace("\n", " ").replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def metrics_table(results: dict[str, Any]) -> list[str]:
    served = results.get("served", {})
    lines = [
        "| model | served as | " + " | ".join(c.replace("_", " ") for c in COLUMNS) + " |",
        "|---|---|" + "---:|" * len(COLUMNS),
    ]
    for variant, metrics in results["metrics"].items():
        info = served.get(variant, {})
        name = info.get("model", "")
        served_as = f"{name} (LoRA)" if info.get("lora") else name
        cells = [fmt(metrics.get(c)) for c in COLUMNS]
        lines.append(
            f"| {LABELS.get(variant, variant)} | {served_as} | " + " | ".join(cells) + " |"
        )
    return lines


def render_markdown(results: dict[str, Any], plots: dict[str, str] | None = None) -> str:
    """report.md from the results dict (numbers exactly those of results.json, 4 decimals)."""
    data = results.get("data", {})
    out = [
        f"# Evaluation of run `{results.get('run')}`",
        "",
        f"{data.get('examples')} held-out examples from `{data.get('source')}` "
        f"({data.get('format')}), greedy, max_tokens {data.get('max_tokens')}, "
        f"{data.get('few_shot')} few-shot examples for the base. "
        f"Served: {results.get('layout')}. Took {results.get('seconds')} s.",
        "",
        *metrics_table(results),
        "",
    ]
    for key, text in (results.get("definitions") or {}).items():
        out.append(f"- **{key.replace('_', ' ')}**: {text}")
    out.append("")
    contract = results.get("contract") or {}
    if contract:
        state = "ok" if contract.get("ok") else f"FAILED: {_cell(contract.get('error'), 400)}"
        out += [
            f"Train/serve contract (chat tokens equal training, greedy stops at EOS): {state}",
            "",
        ]
    for title, name in (("Training and validation loss", "loss"), ("Comparison", "comparison")):
        if plots and name in plots:
            out += [f"## {title}", "", f"![{name}]({plots[name]})", ""]
    out += parity_section(results.get("parity") or {})
    out += speed_section(results.get("speed") or {})
    out += lm_eval_section(results.get("lm_eval") or {})
    preds = results.get("predictions") or {}
    variants = [v for v in results["metrics"] if v in preds]
    if variants:
        count = min(SAMPLE_ROWS, len(preds[variants[0]]))
        out += [f"## First {count} examples", ""]
        out.append(
            "| question | reference | " + " | ".join(LABELS.get(v, v) for v in variants) + " |"
        )
        out.append("|---|---|" + "---|" * len(variants))
        for i in range(count):
            first = preds[variants[0]][i]
            cells = [_cell(first["question"]), _cell(first["reference"], 30)]
            cells += [
                _cell(preds[v][i]["prediction"] or preds[v][i].get("error"), 30) for v in variants
            ]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    out.append("All numbers and every prediction: `results.json`.")
    return "\n".join(out) + "\n"


def parity_section(parity: dict[str, Any]) -> list[str]:
    """The train/serve parity gate's verdict, its largest difference and the worst prompt."""
    out = ["## Train/serve parity gate", ""]
    if "skipped" in parity:
        return [*out, f"Not run: {parity['skipped']}.", ""]
    if parity.get("error"):
        return [*out, f"FAILED: could not run: {_cell(parity['error'], 600)}", ""]
    worst = parity.get("worst") or {}
    state = "passed" if parity.get("ok") else "FAILED"
    out.append(
        f"{state}: {parity.get('examples')} held-out prompts, transformers on base + adapter (as "
        f"trained, fp32) vs the server; max |Δ logprob| of a reference token "
        f"{_sci(parity.get('max_abs_delta'))} nats (tolerance {parity.get('tolerance')}), "
        f"greedy answers equal on {fmt(parity.get('greedy_agreement'))} of them."
    )
    if worst and not parity.get("ok"):
        out += [
            "",
            f"Worst prompt: {_cell(worst.get('question'), 200)} (reference "
            f"{_cell(worst.get('reference'), 60)}): {_cell('; '.join(worst.get('problems', [])), 600)}",
        ]
    return [*out, ""]


def speed_section(speed: dict[str, Any]) -> list[str]:
    """Serving speed per variant, measured on the eval's own streamed requests."""
    rows = {v: s for v, s in speed.items() if s}
    if not rows:
        return []
    out = [
        "## Serving speed",
        "",
        "Measured on the eval requests themselves (streamed chat completions).",
        "",
        "| model | requests | concurrency | output tokens/s | TTFT p50 s | TTFT p95 s | "
        "latency p50 s | latency p95 s | server shared with |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for variant, s in rows.items():
        cells = [s.get("requests"), s.get("concurrency"), s.get("output_tokens_per_s")]
        cells += [s.get(k) for k in ("ttft_p50_s", "ttft_p95_s", "latency_p50_s", "latency_p95_s")]
        shared = ", ".join(LABELS.get(v, v) for v in s.get("shared_server_with") or []) or "-"
        out.append(
            f"| {LABELS.get(variant, variant)} | "
            + " | ".join(fmt(c) for c in cells)
            + f" | {shared} |"
        )
    return [*out, ""]


def lm_eval_section(lm_eval: dict[str, Any]) -> list[str]:
    """lm-eval's numbers (value ± its stderr) per task and model, then the forgetting check."""
    out = ["## lm-evaluation-harness", ""]
    if "tasks" not in lm_eval:
        reason = lm_eval.get("skipped") or lm_eval.get("error") or "no tasks"
        return [*out, f"Not run: {reason}.", ""]
    variants = [v for v in ("finetuned", "base") if v in lm_eval]
    limit = f", --limit {lm_eval['limit']}" if lm_eval.get("limit") else ""
    chat = ", ".join(f"{LABELS[v]} {fmt(bool(lm_eval[v].get('chat_template')))}" for v in variants)
    out.append(
        "lm-eval's `local-completions` client against the served models (chat template "
        f"applied: {chat}){limit}; "
        "value ± lm-eval's standard error."
    )
    out += ["", "| task | metric | " + " | ".join(LABELS[v] for v in variants) + " |"]
    out.append("|---|---|" + "---:|" * len(variants))
    for task in lm_eval["tasks"]:
        found = {v: (lm_eval[v].get("tasks") or {}).get(task) or {} for v in variants}
        names = list(dict.fromkeys(m for v in variants for m in found[v]))
        for metric in names or ["-"]:
            cells = []
            for v in variants:
                entry = found[v].get(metric)
                if entry is None:
                    cells.append(
                        _cell(lm_eval[v].get("error") or lm_eval[v].get("skipped"), 40) or "-"
                    )
                else:
                    cells.append(f"{fmt(entry['value'])} ± {fmt(entry.get('stderr'))}")
            out.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    out.append("")
    forgetting = lm_eval.get("forgetting")
    if forgetting:
        flagged = forgetting.get("flagged") or []
        verdict = (
            f"FLAGGED: {', '.join(flagged)} fell below {forgetting['ratio']} x the base"
            if flagged
            else f"no general task below {forgetting['ratio']} x the base"
        )
        out += [f"Forgetting check (eval.general_tasks): {verdict}.", ""]
        for row in forgetting.get("tasks", []):
            if row.get("flagged") is None:
                out.append(f"- {row['task']}: not compared ({row.get('error')})")
            else:
                out.append(
                    f"- {row['task']} ({row['metric']}): base {fmt(row['base'])}, fine-tuned "
                    f"{fmt(row['finetuned'])}, ratio {fmt(row['ratio'])}"
                    + (" **FLAGGED**" if row["flagged"] else "")
                )
        out.append("")
    return out


def plot_losses(rows: list[dict[str, Any]], out: Path) -> Path | None:
    """Training loss and validation loss (metrics.jsonl's rows) against the step; None
    without loss rows."""
    from matplotlib.figure import Figure

    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None and "step" in r]
    val = [
        (r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None and "step" in r
    ]
    if not train and not val:
        return None
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train, strict=True), label="training loss")
    if val:
        ax.plot(*zip(*val, strict=True), marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(out, dpi=100)
    return out


def plot_comparison(results: dict[str, Any], out: Path) -> Path | None:
    """Exact match and accuracy per model, side by side."""
    from matplotlib.figure import Figure

    metrics = results.get("metrics") or {}
    if not metrics:
        return None
    names = [LABELS.get(v, v) for v in metrics]
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.subplots()
    width = 0.38
    xs = range(len(names))
    for offset, key in ((-width / 2, "exact_match"), (width / 2, "accuracy")):
        values = [m[key] for m in metrics.values()]
        bars = ax.bar([x + offset for x in xs], values, width, label=key.replace("_", " "))
        ax.bar_label(bars, fmt="%.2f")
    ax.set_xticks(list(xs), names)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("fraction of examples")
    ax.legend()
    fig.savefig(out, dpi=100)
    return out


def write_report(run: RunDir, results: dict[str, Any]) -> dict[str, Path]:
    """Write results.json, the plots and report.md into RUN_DIR/eval; returns their paths."""
    run.eval.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    written: dict[str, Path] = {}
    for name, make in (
        ("loss", lambda p: plot_losses(run.metrics(), p)),
        ("comparison", lambda p: plot_comparison(results, p)),
    ):
        try:
            path = make(run.eval_plot(name))
        except Exception as exc:  # a plot is never worth failing the evaluation
            log.warning("could not draw %s.png: %s", name, exc)
            continue
        if path:
            plots[name] = path.name
            written[name] = path
    results["plots"] = dict(plots)
    RunDir.write_atomic(run.eval_results, json.dumps(results, indent=2) + "\n")
    RunDir.write_atomic(run.eval_report, render_markdown(results, plots))
    written |= {"results": run.eval_results, "report": run.eval_report}
    return written
