"""eval_run on a fake run directory (plan.json from the real resolver, a random LoRA
final/): report.md and results.json agree, against the shared server and with its own."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from launcher.rundir import RunDir

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]


def _table(report: str) -> dict[str, list[str]]:
    """The metrics table of report.md: label -> cells after 'served as'."""
    rows = {}
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| model | served as"))
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[2:]
    return rows


def _check_agree(run: Path, results: dict) -> dict:
    from serve.report import COLUMNS, LABELS, fmt

    on_disk = json.loads(RunDir(run).eval_results.read_text())
    assert on_disk["metrics"] == results["metrics"]
    table = _table(RunDir(run).eval_report.read_text())
    assert set(table) == {LABELS[v] for v in on_disk["metrics"]}
    for variant, metrics in on_disk["metrics"].items():
        assert table[LABELS[variant]] == [fmt(metrics[c]) for c in COLUMNS]
        rows = on_disk["predictions"][variant]
        assert metrics["examples"] == len(rows) == on_disk["data"]["examples"]
        assert metrics["exact_match"] == sum(r["exact_match"] for r in rows) / len(rows)
        assert metrics["accuracy"] == sum(r["correct"] for r in rows) / len(rows)
    return on_disk


def test_eval_against_the_shared_endpoint(server, serve_run: Path) -> None:
    from serve.eval import eval_run

    results = eval_run(serve_run, endpoint=server.url)
    on_disk = _check_agree(serve_run, results)
    assert set(on_disk["metrics"]) == {"finetuned", "base", "base_few_shot"}
    assert on_disk["served"]["finetuned"]["model"] == "qs"
    assert on_disk["data"]["examples"] == 6 and on_disk["data"]["few_shot"] == 2
    # the tiny base was trained on the task; the random adapter ruins it
    assert (
        on_disk["metrics"]["base"]["exact_match"] > on_disk["metrics"]["finetuned"]["exact_match"]
    )
    for metrics in on_disk["metrics"].values():
        assert metrics["errors"] == 0
        assert metrics["perplexity"] and math.isfinite(metrics["perplexity"])
        assert metrics["perplexity_examples"] == 6
    assert on_disk["metrics"]["base"]["perplexity"] < on_disk["metrics"]["finetuned"]["perplexity"]
    assert isinstance(on_disk["contract"]["ok"], bool)  # a random adapter may never stop
    assert "lm_eval" in on_disk
    for plot in ("loss", "comparison"):
        assert RunDir(serve_run).eval_plot(plot).stat().st_size > 1000
    report = RunDir(serve_run).eval_report.read_text()
    assert "![loss](loss.png)" in report and "![comparison](comparison.png)" in report


def test_eval_starts_its_own_server(serve_run: Path, api_key: str) -> None:
    from serve.eval import eval_run

    results = eval_run(serve_run)
    on_disk = _check_agree(serve_run, results)
    assert on_disk["layout"] == "one server: base + LoRA module"
    assert on_disk["served"]["finetuned"]["lora"] is True
    assert on_disk["served"]["base"]["path"] == str(RunDir(serve_run).base)
    log = Path(on_disk["served"]["finetuned"]["log"])
    assert log == RunDir(serve_run).named_server_log("eval")
    assert log.is_file() and api_key not in log.read_text(errors="replace")
    assert re.search(r"\| fine-tuned \| qs \(LoRA\) \|", RunDir(serve_run).eval_report.read_text())
