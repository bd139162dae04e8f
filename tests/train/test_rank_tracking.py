"""Trackers as the rank receives them: the trainer's report_to and run name, and the
variables the TensorBoard, W&B and MLflow callbacks read, set on the rank from plan.json
(launcher/train/tracking.py). Built without launching anything (as test_rank_args.py)."""

from __future__ import annotations

import json
from pathlib import Path

from launcher.plan_files import write_plan
from launcher.rundir import RunDir
from launcher.train.tracking import tracker_env

from .test_rank_args import build, plan_for

ALL = "train.trackers=[tensorboard,wandb,mlflow]"


def test_every_tracker_reaches_the_trainer_under_the_run_name(tmp_path: Path) -> None:
    args = build(plan_for(tmp_path, ALL))
    assert args.report_to == ["tensorboard", "wandb", "mlflow"]
    assert args.run_name == "quickstart"


def test_defaults_put_every_tracker_in_the_run_directory(tmp_path: Path) -> None:
    plan = plan_for(tmp_path, ALL)
    run = RunDir(plan.run_dir)
    assert tracker_env(plan) == {
        "TENSORBOARD_LOGGING_DIR": str(run.tensorboard),
        "WANDB_PROJECT": "quickstart",
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(run.path),  # W&B writes RUN_DIR/wandb
        "WANDB_LOG_MODEL": "false",
        "MLFLOW_TRACKING_URI": f"sqlite:///{run.mlflow_db}",
        "MLFLOW_EXPERIMENT_NAME": "quickstart",
    }


def test_the_rank_reads_the_settings_from_plan_json(tmp_path: Path) -> None:
    from launcher.config.plan import Plan

    plan = plan_for(
        tmp_path,
        "train.trackers=[wandb,mlflow]",
        "tracking.project=sweep-7",
        "tracking.wandb_entity=lab",
        "tracking.mlflow_tracking_uri=http://mlflow.internal:5000",
    )
    write_plan(plan)
    on_rank = Plan.model_validate_json(RunDir(plan.run_dir).plan_file.read_text())
    env = tracker_env(on_rank)
    assert env["WANDB_PROJECT"] == "sweep-7" and env["WANDB_ENTITY"] == "lab"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000"
    assert env["MLFLOW_EXPERIMENT_NAME"] == "sweep-7"
    assert "TENSORBOARD_LOGGING_DIR" not in env  # not asked for
    assert json.loads(RunDir(plan.run_dir).plan_file.read_text())["tracking"]["wandb_entity"] == (
        "lab"
    )


def test_no_trackers_no_variables(tmp_path: Path) -> None:
    plan = plan_for(tmp_path, "train.trackers=[]")
    assert tracker_env(plan) == {} and build(plan).report_to == []


def test_a_resumed_run_may_change_its_trackers_but_not_its_data(tmp_path: Path) -> None:
    from launcher.config.resume import compare

    before = plan_for(tmp_path).recipe.model_dump(mode="json")
    other = tmp_path / "other.jsonl"
    other.write_text('{"instruction": "q", "output": "a"}\n')
    after = plan_for(
        tmp_path, ALL, "tracking.project=again", f"data.train=[{{path: {other}}}]"
    ).recipe.model_dump(mode="json")
    verdict = compare(before, after, packing=False, where="checkpoint-10")
    assert [p.path for p in verdict.refused] == ["data.train"]
    assert sorted(change.split()[0] for change in verdict.applied) == [
        "tracking.project",
        "train.trackers",
    ]
