"""The eval's gates against the shared vLLM server (tests/serve/conftest.py: the tiny base,
trained on the quickstart task, as "base" and a random LoRA adapter as "qs"):

- the forgetting check, for real: lm-eval's quickstart task (recipes/tasks/quickstart) scored
  for base and fine-tuned; the random adapter destroys the skill the base had, so the report
  flags it (the passing case and the ratio arithmetic: tests/serve/test_lm_eval_units.py);
- the train/serve parity gate: it passes for the adapter as served, and fails the eval, with
  the worst prompt shown, when training's chat template is not the one the server applies.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import RUN_OVERRIDES
from serve_models import REPO, make_run_dir

from launcher.errors import RunError
from launcher.rundir import RunDir

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]


def _run_like(serve_run: Path, root: Path, overrides: list[str]) -> Path:
    """A run named like serve_run (so its adapter is the served "qs") with other eval settings."""
    run = make_run_dir(root / serve_run.name, [*RUN_OVERRIDES, *overrides])
    for part in ("base", "final"):
        shutil.copytree(serve_run / part, run / part)
    return run


def test_forgetting_flagged_when_finetuning_destroys_a_general_skill(
    server, serve_run: Path, tmp_path: Path
) -> None:
    from serve.eval import eval_run

    run = _run_like(
        serve_run,
        tmp_path,
        [
            f"eval.lm_eval_include=[{REPO / 'recipes' / 'tasks' / 'quickstart'}]",
            "eval.general_tasks=[quickstart_sentiment]",
            "eval.lm_eval_limit=24",
            "eval.compare_base=true",
            "eval.few_shot=0",
        ],
    )
    results = eval_run(run, endpoint=server.url)
    lm = results["lm_eval"]
    base = lm["base"]["tasks"]["quickstart_sentiment"]["acc"]
    fine = lm["finetuned"]["tasks"]["quickstart_sentiment"]["acc"]
    assert base["value"] >= 0.8, lm["base"]  # the base learned the task
    assert fine["value"] < 0.9 * base["value"], lm["finetuned"]
    assert base["stderr"] is not None and fine["stderr"] is not None
    assert lm["forgetting"]["flagged"] == ["quickstart_sentiment"], lm["forgetting"]
    report = RunDir(run).eval_report.read_text()
    assert "FLAGGED: quickstart_sentiment" in report
    assert f"{base['value']:.4f} ± {base['stderr']:.4f}" in report
    on_disk = json.loads(RunDir(run).eval_results.read_text())
    assert on_disk["lm_eval"]["forgetting"] == lm["forgetting"]
    # the parity gate passed on the adapter as vLLM serves it (checked before the numbers)
    assert results["parity"]["ok"] is True, results["parity"]
    assert results["parity"]["max_abs_delta"] <= results["parity"]["tolerance"]


def test_parity_gate_fails_eval_on_a_mismatched_chat_template(
    server, serve_run: Path, tmp_path: Path
) -> None:
    from serve.eval import eval_run

    run = _run_like(serve_run, tmp_path, ["eval.parity_examples=3"])
    # training's chat template put a default system line before every chat; the server's (the
    # base tokenizer's, which vLLM's LoRA path applies) does not
    contract_file = RunDir.contract_file(RunDir(run).final)
    contract = json.loads(contract_file.read_text())
    contract["chat_template"] = "Answer in one word.\n" + contract["chat_template"]
    contract_file.write_text(json.dumps(contract))
    with pytest.raises(RunError, match="parity gate failed") as failed:
        eval_run(run, endpoint=server.url)
    results = json.loads(RunDir(run).eval_results.read_text())
    parity = results["parity"]
    assert parity["ok"] is False
    worst = parity["worst"]
    assert repr(worst["question"]) in str(failed.value)  # the worst prompt is shown
    assert any("formats the prompt differently" in p for p in worst["problems"]), worst
    assert "Train/serve parity gate\n\nFAILED" in RunDir(run).eval_report.read_text()
