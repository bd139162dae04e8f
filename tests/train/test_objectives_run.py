"""The preference and reward objectives trained for real: the shipped CPU recipes
(recipes/cpu/{reward,kto,orpo,dpo,cpt}.yaml, orpo.yaml switched to SimPO, cpt.yaml streamed) shortened, 2
processes on gloo through the real CLI, back to back in one module fixture. The reward model
goes through the whole pipeline (train, then eval's in-process reward accuracy against the
untrained base); the others train a handful of steps and their loss must go down."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from launcher.rundir import RunDir
from launcher.train.samples import steps_to_rows

from .conftest import PYTHON, REPO, cli_env, explain, train_losses
from .test_resume_anywhere import LOSS_RTOL, loss_by_step

pytestmark = pytest.mark.train

CPU = REPO / "recipes" / "cpu"
SHORT = ["train.save_steps=12", "train.logging_steps=3", "train.max_steps=12"]
STREAMED = [
    "data.streaming=true",
    "data.val_split=0",
    "data.validation=../data/reviews_text_eval.jsonl",
]
EVERY_STEP = ["train.logging_steps=1", "train.log_samples=true", "train.save_steps=4"]
RUNS: dict[str, tuple[str, list[str]]] = {
    # the whole pipeline: train then eval (the recipe's own 60 steps take ~7 s)
    "reward": ("reward", ["train.logging_steps=10", "eval.max_examples=40"]),
    # KTO's loss starts flat (its KL estimate moves with the policy): 30 steps, ~9 s
    "kto": ("kto", ["train.max_steps=30", "train.save_steps=30", "train.logging_steps=5"]),
    "orpo": ("orpo", SHORT),
    "simpo": ("orpo", [*SHORT, "train.preference_loss=simpo", "train.dpo_beta=2.0"]),
    # DPO's loss starts at ln 2 and wanders for its first dozen steps: 30 steps
    "dpo": ("dpo", ["train.max_steps=30", "train.save_steps=30", "train.logging_steps=5"]),
    # continued pretraining streamed (data.streaming): the text read, packed and split
    # between the 2 ranks as training consumes it; a held-out file read whole for validation.
    # Every step's loss and rows logged, a checkpoint every 4 steps: the uninterrupted run
    # test_a_streamed_run_resumes_as_if_uninterrupted compares with
    "cpt": ("cpt", [*SHORT, *STREAMED, *EVERY_STEP]),
    # the guides' sentiment classifier as written (60 steps): train, then eval against the base
    "classifier": ("classifier", []),
}
WITH_EVAL = ("reward", "classifier")


def _run(
    run_dir: Path, recipe: Path, stages: str, sets: list[str], env: dict[str, str] | None = None
) -> Any:
    """`tune-launch run RECIPE --stages STAGES --run-dir RUN_DIR --set ...`."""
    argv = [PYTHON, "-m", "launcher.cli", "run", str(recipe), "--stages", stages]
    argv += ["--run-dir", str(run_dir)]
    for assignment in sets:
        argv += ["--set", assignment]
    return subprocess.run(
        argv, cwd=REPO, env=env or cli_env(), capture_output=True, text=True, timeout=420
    )


@pytest.fixture(scope="module")
def objective_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("objectives")
    runs = {}
    for name, (recipe, sets) in RUNS.items():
        run_dir = root / name
        stages = "train,eval" if name in WITH_EVAL else "train"
        started = time.monotonic()
        result = _run(run_dir, CPU / f"{recipe}.yaml", stages, sets)
        assert result.returncode == 0, explain(result)
        print(f"{name}: {time.monotonic() - started:.0f} s")
        runs[name] = run_dir
    return runs


def test_reward_model_beats_its_untrained_base_on_held_out_pairs(
    objective_runs: dict[str, Path],
) -> None:
    run = RunDir(objective_runs["reward"])
    losses = train_losses(run.path)
    assert losses[-1] < losses[0] - 0.2, losses
    # the score head is saved beside the adapter (modules_to_save)
    config = json.loads((run.final / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    results = json.loads(run.eval_results.read_text())
    tuned, base = results["metrics"]["finetuned"], results["metrics"]["base"]
    assert tuned["examples"] == base["examples"] == 40
    assert tuned["reward_accuracy"] >= 0.75, results["metrics"]
    assert tuned["reward_accuracy"] > base["reward_accuracy"] + 0.2, results["metrics"]
    assert tuned["reward_margin"] > 0.5 > abs(base["reward_margin"])
    assert "reward accuracy" in run.eval_report.read_text()


def test_the_classifier_beats_the_untrained_base(objective_runs: dict[str, Path]) -> None:
    """recipes/cpu/classifier.yaml as written: accuracy on its held-out split, in-process,
    the trained model against the base it started from."""
    run = RunDir(objective_runs["classifier"])
    losses = train_losses(run.path)
    assert losses[-1] < losses[0], losses
    metrics = json.loads(run.eval_results.read_text())["metrics"]
    assert metrics["finetuned"]["accuracy"] > metrics["base"]["accuracy"], metrics


@pytest.mark.parametrize("name", ["kto", "orpo", "simpo", "dpo", "cpt"])
def test_objective_loss_goes_down(name: str, objective_runs: dict[str, Path]) -> None:
    run = RunDir(objective_runs[name])
    losses = train_losses(run.path)
    assert len(losses) >= 4 and losses[-1] < losses[0], losses
    plan = json.loads(run.plan_file.read_text())
    assert plan["objective"] == {"cpt": "sft"}.get(name, name)
    assert RunDir.is_complete(run.final)
    evaluated = [m for m in run.metrics() if m.get("eval_loss") is not None]
    assert evaluated, "the recipe's held-out rows were not evaluated"
    if name == "cpt":  # streamed: the report counts no rows it could not know
        report = json.loads(run.data_report_file.read_text())
        assert report[0]["streamed"] is True and report[0]["rows"] is None, report
        assert json.loads(run.train_facts_file.read_text())["train_rows"] is None
    if name == "kto":  # desirable completions above undesirable ones on held-out rows
        assert evaluated[-1]["eval_rewards/margins"] > 0, evaluated[-1]


def test_a_streamed_run_resumes_as_if_uninterrupted(
    objective_runs: dict[str, Path], tmp_path: Path
) -> None:
    """The cpt run again, rank 0 killed right after its checkpoint of step 4, then the same
    command: the resumed run reads the stream again and skips the 4 steps trained, and every
    later step trains the rows, and reaches the loss, of the uninterrupted run, across the
    end of the stream's first pass (at step 7: its 480 rows pack into ~110 blocks). Resuming
    a checkpoint trained past that end is refused before any process starts."""
    baseline, run_dir = objective_runs["cpt"], tmp_path / "resumed"
    _, sets = RUNS["cpt"]
    fault = cli_env(TUNE_LAUNCH_FAULT="exit_after_save:4")
    stopped = _run(run_dir, CPU / "cpt.yaml", "train", sets, env=fault)
    assert stopped.returncode == 1, explain(stopped)
    resumed = _run(run_dir, CPU / "cpt.yaml", "train", sets, env=fault)
    assert resumed.returncode == 0, explain(resumed)
    assert "resuming from checkpoint-4 (step 4) with the same recipe" in resumed.stderr
    ours, theirs = loss_by_step(run_dir), loss_by_step(baseline)
    assert sorted(ours) == sorted(theirs) == list(range(1, 13)), "every step logged once"
    worst = max(abs(ours[s] - theirs[s]) / abs(theirs[s]) for s in ours)
    assert worst <= LOSS_RTOL, f"loss differs from the uninterrupted run by {worst:.2e}"
    assert steps_to_rows(RunDir(run_dir)) == steps_to_rows(RunDir(baseline))
    # the uninterrupted run's last checkpoint is past the stream's first pass
    copy = RunDir(tmp_path / "past-first-pass")
    shutil.copytree(baseline, copy.path)
    logs_before = {p.name: p.stat().st_mtime for p in copy.logs.iterdir()}
    refused = _run(copy.path, CPU / "cpt.yaml", "train", [*sets, "train.max_steps=16"])
    assert refused.returncode == 2, explain(refused)
    assert "Traceback" not in refused.stderr and "cannot resume" in refused.stderr
    assert "data.streaming: checkpoint-12 (step 12) was trained past the end" in refused.stderr
    # nothing started: no rank wrote
    assert {p.name: p.stat().st_mtime for p in copy.logs.iterdir()} == logs_before
