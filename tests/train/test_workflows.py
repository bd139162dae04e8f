"""Workflows through the real CLI: a sweep of the quickstart (three variants trained for
real, compared) and the shipped three-stage recipe (continued pretraining -> SFT -> DPO, each
stage from the previous one's result, evaluated at the end through vLLM against the first
stage's base)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from launcher.rundir import RunDir

from .conftest import PYTHON, QUICKSTART, REPO, cli_env, explain, tensors

THREE_STAGE = REPO / "recipes" / "cpu" / "three_stage.yaml"


def tune(
    *args: str, timeout: float = 900, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "launcher.cli", *args],
        cwd=REPO,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, explain(result)
    return result.stdout + result.stderr


@pytest.mark.train
def test_sweep_trains_three_variants_and_compares_them(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    argv = ["sweep", str(QUICKSTART), "--grid", "method.r=4,16", "--grid", "method.kind=lora,full"]
    argv += ["--sweep-dir", str(sweep)]
    for item in ("train.max_steps=30", "eval.enabled=false", "serve.enabled=false"):
        argv += ["--set", item]
    argv += ["--set", "merge.enabled=false"]
    ok(tune(*argv))
    doc = json.loads((sweep / "comparison.json").read_text())
    rows: dict[str, Any] = doc["variants"]
    # r=4/full and r=16/full train the same thing: one variant
    assert list(rows) == ["r=4_kind=lora", "kind=full", "r=16_kind=lora"]
    assert rows["kind=full"]["same_as"] == ["r=16_kind=full"]
    assert (
        rows["r=4_kind=lora"]["trainable_params"] * 4 == rows["r=16_kind=lora"]["trainable_params"]
    )
    assert rows["kind=full"]["trainable_params"] == rows["kind=full"]["total_params"]
    for name, row in rows.items():
        assert row["state"] == "done", name
        # what the rank counted is what the planner predicted
        assert row["trainable_params"] == row["trainable_params_planned"], name
        for key in ("peak_memory_gib", "wall_s", "train_s", "tokens_per_s", "final_loss"):
            assert isinstance(row[key], int | float) and row[key] > 0, (name, key, row[key])
        assert row["final_eval_loss"] < 1.0  # it learnt the task (the untrained loss is ~7)
    assert doc["best"] == min(rows, key=lambda n: rows[n]["final_eval_loss"])
    table = (sweep / "comparison.md").read_text()
    assert f"`{doc['best']}` **(best)**" in table
    assert (sweep / "comparison.png").stat().st_size > 10_000
    # the same command again: nothing retrained, the comparison rewritten
    again = ok(tune(*argv, timeout=300))
    assert again.count("done already") == 3 and "launch (attempt" not in again
    status = ok(tune("status", str(sweep)))
    assert "3 variant(s)" in status and f"best: {doc['best']}" in status


@pytest.mark.train
@pytest.mark.vllm
def test_three_stage_recipe_chains_each_stage_from_the_previous_result(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # one vLLM server for the report (the fine-tuned model only): CI time
    argv = [str(THREE_STAGE), "--run-dir", str(run_dir), "--set", "eval.compare_base=false"]
    # the second stage dies right after its checkpoint of step 50: the chain stops there
    failed = tune(*argv, env=cli_env(TUNE_LAUNCH_FAULT="exit_after_save:50"))
    assert failed.returncode == 1, explain(failed)
    assert "stage 2/3 (sft) failed: the later stages did not start" in failed.stderr
    assert not (run_dir / "stages" / "2-dpo").exists()
    # the same command again: the first stage is not retrained, the second resumes at 50
    out = ok(tune(*argv))
    assert "stage 1/3 (cpt): done already" in out
    assert "resuming from" in out and "checkpoint-50 (step 50)" in out
    state = json.loads((run_dir / "workflow.json").read_text())["stages"]
    assert [(s["name"], s["state"]) for s in state] == [
        ("cpt", "done"),
        ("sft", "done"),
        ("dpo", "done"),
    ]
    cpt, sft, dpo = (RunDir(run_dir / "stages" / n) for n in ("0-cpt", "1-sft", "2-dpo"))
    # each stage's plan starts from the previous result: full weights, then the merged model
    assert sft.load_plan().base_model == str(cpt.final)
    assert dpo.load_plan().base_model == str(sft.merged)
    assert state[1]["starts_from"] == {"path": str(cpt.final), "marker": cpt.read_marker(cpt.final)}
    # and the weights say so: LoRA on all linear layers leaves the embeddings alone, so each
    # merged model carries its predecessor's (trained) embeddings, not the original base's
    embed = "model.embed_tokens.weight"
    base = tensors(cpt.base / "model.safetensors")[embed]
    after_cpt = tensors(cpt.final / "model.safetensors")[embed]
    assert float((after_cpt - base).abs().max()) > 1e-4  # continued pretraining changed them
    for stage in (sft, dpo):
        merged = tensors(next(stage.merged.glob("*.safetensors")))[embed]
        assert bool((merged == after_cpt).all()), stage.path
    results = json.loads(dpo.eval_results.read_text())
    assert results["metrics"]["finetuned"]["exact_match"] >= 0.9, results["metrics"]
    assert "stage 3/3 (dpo)" in out
    # the same command again: every stage is done, nothing runs
    again = ok(tune(*argv))
    assert again.count("done already") == 3 and "launch (attempt" not in again
