"""The README's main job, as CI runs it: `make quickstart` trains, merges, serves with the
real vLLM and evaluates; the report shows the fine-tuned model beating the base, lm-eval's
numbers for both, the train/serve parity gate passed and the serving speed."""

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
    _check_gates_and_lm_eval(results, report)


def _check_gates_and_lm_eval(results: dict, report: str) -> None:
    # the parity gate: transformers on base + adapter agrees with vLLM on the merged model
    parity = results["parity"]
    assert parity["ok"] is True, parity
    assert parity["examples"] == 8 and parity["greedy_agreement"] == 1.0
    assert parity["max_abs_delta"] <= parity["tolerance"]  # ~1e-7 measured (fp32 both sides)
    assert "## Train/serve parity gate\n\npassed" in report
    # lm-evaluation-harness on the shipped local task (recipes/tasks/quickstart), both models
    lm = results["lm_eval"]
    assert lm["tasks"] == ["quickstart_sentiment", "quickstart_sentiment_gen"], lm
    scores = {}
    for variant in ("finetuned", "base"):
        assert "error" not in lm[variant], lm[variant]
        tasks = lm[variant]["tasks"]
        assert lm[variant]["n_samples"] == {t: 60 for t in lm["tasks"]}
        scores[variant] = (
            tasks["quickstart_sentiment"]["acc"],
            tasks["quickstart_sentiment_gen"]["exact_match"],
        )
        for metric in scores[variant]:
            assert metric["stderr"] is not None
            assert f"{metric['value']:.4f} ± {metric['stderr']:.4f}" in report
    assert scores["finetuned"][0]["value"] >= 0.9, lm  # label likelihood: 1.0 measured
    assert scores["finetuned"][1]["value"] >= 0.6, lm  # greedy exact match: 1.0 measured
    assert scores["finetuned"][1]["value"] > scores["base"][1]["value"], lm
    # the forgetting check passes a run that kept (here: gained) the skill; flagging one that
    # lost it: tests/serve/test_eval_gates.py
    assert lm["forgetting"]["flagged"] == [], lm["forgetting"]
    assert "no general task below 0.9 x the base" in report
    # serving speed, measured on the fine-tuned model's own eval requests
    speed = results["speed"]["finetuned"]
    assert speed["requests"] == 60 and speed["concurrency"] == results["data"]["concurrency"]
    assert speed["output_tokens"] >= 60 and speed["output_tokens_per_s"] > 0
    assert 0 < speed["ttft_p50_s"] <= speed["ttft_p95_s"]
    assert 0 < speed["latency_p50_s"] <= speed["latency_p95_s"]
    assert "## Serving speed" in report
