"""The README's main job, as CI runs it: `make quickstart` trains, merges, serves with the
real vLLM and evaluates; the report shows the fine-tuned model beating the base."""

from __future__ import annotations

import json

import pytest

from launcher.rundir import RunDir


@pytest.mark.train
@pytest.mark.vllm
def test_make_quickstart_end_to_end(quickstart_run: RunDir) -> None:
    # trained, merged (verified against base + adapter), evaluated
    run = quickstart_run
    assert (run.final / "adapter_model.safetensors").is_file()
    assert run.is_complete(run.merged)
    results = json.loads(run.eval_results.read_text())
    report = run.eval_report.read_text()
    metrics = results["metrics"]
    fine, base = metrics["finetuned"]["exact_match"], metrics["base"]["exact_match"]
    assert fine > base, metrics
    assert fine >= 0.6, metrics  # the quickstart task is learnable: ~0.85 measured
    assert f"| {fine:.4f} |" in report  # the report shows what results.json holds
    # the train/serve contract: the server tokenizes the chat prompt as training did, stops at EOS
    assert results["contract"].get("ok") is True, results["contract"]
    train_losses = [r["loss"] for r in run.metrics() if r.get("loss") is not None]
    assert train_losses[-1] < train_losses[0] - 3.0
    assert list(run.eval.glob("*.png")), "loss and comparison plots"
