"""DoRA, IA3, prompt and prefix tuning trained for real: the shipped CPU recipes
(recipes/cpu/*.yaml) shortened, 2 processes on gloo through the real CLI, back to back in one
module fixture; then a prompt-tuning run resumed from its checkpoint, refused by `serve` and
`merge` (exit 2, the reason), and evaluated in-process (`tune-launch eval`)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from launcher.rundir import RunDir

from .conftest import PYTHON, REPO, cli_env, explain, run_cli, train_losses

pytestmark = pytest.mark.train

METHODS = ("dora", "ia3", "prompt", "prefix")
SHORT = ["train.max_steps=12", "train.save_steps=6", "train.logging_steps=3"]
# DDP starts ~25 s faster than DeepSpeed on 2 CPU cores; the prompt run keeps the recipe's
# ZeRO-2 (its checkpoint is resumed below)
FASTER = {"dora": ["distributed.strategy=ddp"], "ia3": ["distributed.strategy=ddp"],
          "prefix": ["distributed.strategy=ddp"], "prompt": []}  # fmt: skip
# the in-process eval of the prompt run: a few examples keep it short
SMALL_EVAL = ["eval.max_examples=6", "eval.few_shot=1"]


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("methods")
    runs = {}
    for name in METHODS:
        run_dir = root / name
        recipe = REPO / "recipes" / "cpu" / f"{name}.yaml"
        result = run_cli(run_dir, *SHORT, *SMALL_EVAL, *FASTER[name], recipe=recipe)
        assert result.returncode == 0, explain(result)
        runs[name] = run_dir
    return runs


@pytest.mark.parametrize("name", METHODS)
def test_method_trains_checkpoints_and_saves_an_adapter(
    name: str, method_runs: dict[str, Path]
) -> None:
    run = RunDir(method_runs[name])
    losses = train_losses(run.path)
    assert losses[-1] < losses[0] - 0.5, losses
    config = json.loads((run.final / "adapter_config.json").read_text())
    peft_type = {"dora": "LORA", "ia3": "IA3", "prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}
    assert config["peft_type"] == peft_type[name]
    assert config.get("use_dora", False) is (name == "dora")
    assert RunDir.is_complete(run.final) and (run.final / "adapter_model.safetensors").is_file()
    checkpoints = [c.path for c in run.list_checkpoints() if c.complete]
    assert checkpoints and all((c / "adapter_model.safetensors").is_file() for c in checkpoints)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "launcher.cli", *args],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=420,
    )  # fmt: skip


def test_prompt_tuning_resumes_is_refused_by_serve_and_merge_and_evaluates_in_process(
    method_runs: dict[str, Path],
) -> None:
    run = RunDir(method_runs["prompt"])
    again = run_cli(
        run.path, "train.max_steps=15", *SHORT[1:], *SMALL_EVAL,
        recipe=REPO / "recipes" / "cpu" / "prompt.yaml",
    )  # fmt: skip
    assert again.returncode == 0, explain(again)
    assert "resuming from" in again.stderr and "checkpoint-12" in again.stderr

    for stage in ("serve", "merge"):
        refused = _cli(stage, str(run.path))
        assert refused.returncode == 2, explain(refused)
        assert "method.kind" in refused.stderr and "virtual tokens" in refused.stderr
        assert "Traceback" not in refused.stderr

    evaluated = _cli("eval", str(run.path))
    assert evaluated.returncode == 0, explain(evaluated)
    results = json.loads(run.eval_results.read_text())
    assert run.eval_report.is_file()
    assert results["layout"].startswith("in-process")
    assert set(results["metrics"]) == {"finetuned", "base", "base_few_shot"}
    assert results["metrics"]["finetuned"]["examples"] == 6
    assert results["metrics"]["finetuned"]["perplexity"] is not None
