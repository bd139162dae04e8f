"""Which recipe changes a checkpoint can resume under (launcher/config/resume.py), and the
host-side check before any process starts (launcher/resume.py) on a run directory written
by hand: no training here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from launcher.config.plan import ClusterFacts, resolve
from launcher.config.recipe import load_recipe, localize
from launcher.config.resume import compare, resumable
from launcher.errors import RecipeError
from launcher.resume import check_resume
from launcher.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def plan_for(run_dir: Path, *sets: str, gpus: int | None = None):  # type: ignore[no-untyped-def]
    recipe = load_recipe(QUICKSTART, list(sets), gpus_per_node=gpus)
    recipe = localize(recipe, QUICKSTART.parent)
    return resolve(recipe, ClusterFacts(run_dir=str(run_dir), python="python", cpus=2))


def with_checkpoint(run_dir: Path, *sets: str, step: int = 10) -> Path:
    """A run directory whose last complete checkpoint was trained under the quickstart."""
    plan = plan_for(run_dir, *sets)
    run = RunDir(run_dir)
    checkpoint = run.checkpoint(step)
    checkpoint.mkdir(parents=True)
    RunDir.checkpoint_plan(checkpoint).write_text(plan.model_dump_json())
    RunDir.mark_complete(checkpoint, {"step": step})
    return checkpoint


def test_resumable_fields_and_sections() -> None:
    assert resumable("train.max_steps") and resumable("resources.nodes")
    assert resumable("eval.max_examples") and resumable("train.learning_rate")
    assert not resumable("method.r") and not resumable("train.seed")
    assert not resumable("distributed.strategy") and not resumable("data.train")
    assert not resumable("train.some_new_setting")  # unknown: refused until someone says why


def test_compare_lists_each_refused_field_with_both_values_and_the_fix() -> None:
    old = {"method": {"r": 16, "kind": "lora"}, "train": {"max_steps": 40, "seed": 1}}
    new = {"method": {"r": 8, "kind": "lora"}, "train": {"max_steps": 80, "seed": 2}}
    verdict = compare(old, new, packing=False, where="checkpoint-40 (step 40)")
    assert [p.path for p in verdict.refused] == ["method.r", "train.seed"]
    r = verdict.refused[0]
    assert "trained with 16" in r.message and r.value == 8
    assert "--set method.r=16" in r.fix and "--restart" in r.fix and "--run-dir" in r.fix
    assert verdict.applied == ["train.max_steps 40 -> 80"]


def test_sequence_length_may_change_without_packing_only() -> None:
    old, new = {"data": {"max_seq_len": 64}}, {"data": {"max_seq_len": 128}}
    assert compare(old, new, packing=False, where="c").applied == ["data.max_seq_len 64 -> 128"]
    refused = compare(old, new, packing=True, where="c").refused
    assert [p.path for p in refused] == ["data.max_seq_len"]
    assert "packed rows" in refused[0].message


def test_check_resume_refuses_before_anything_is_written(tmp_path: Path) -> None:
    with_checkpoint(tmp_path)
    plan = plan_for(tmp_path, "method.r=8", "train.precision=bf16", "train.max_steps=500")
    with pytest.raises(RecipeError) as caught:
        check_resume(plan, restart=False)
    paths = [p.path for p in caught.value.problems]
    assert paths == ["method.r", "train.precision"]
    assert "cannot resume" in caught.value.render()
    assert not RunDir(tmp_path).plan_file.exists()  # nothing of this run was written


def test_check_resume_applies_what_it_can_and_names_the_new_world_size(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint = with_checkpoint(tmp_path)
    plan = plan_for(tmp_path, "train.max_steps=500", gpus=1)
    with caplog.at_level("INFO", logger="tune_launch"):
        assert check_resume(plan, restart=False).path == checkpoint  # type: ignore[union-attr]
    line = caplog.text
    assert "resuming from checkpoint-10 (step 10); applying:" in line
    assert "train.max_steps 300 -> 500" in line and "resources.gpus_per_node 2 -> 1" in line
    assert "processes 2 -> 1 (ZeRO state resharded at start)" in line
    assert "gradient accumulation 2 -> 4 (global batch 16)" in line


def test_restart_removes_what_training_wrote(tmp_path: Path) -> None:
    with_checkpoint(tmp_path)
    run = RunDir(tmp_path)
    run.final.mkdir()
    run.metrics_file.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    run.logs.mkdir()
    run.samples_log(0).write_text("{}\n")
    run.wandb.mkdir()
    run.mlflow_db.write_text("")
    assert check_resume(plan_for(tmp_path, "method.r=8"), restart=True) is None
    assert not run.checkpoints.exists() and not run.final.exists()
    assert not run.wandb.exists() and not run.mlflow_db.exists()  # the old run's tracking
    assert not run.metrics_file.exists() and not run.samples_logs()
    assert run.logs.is_dir()  # the logs of earlier attempts stay


def test_a_checkpoint_without_its_plan_is_compared_with_the_run_plan(tmp_path: Path) -> None:
    checkpoint = with_checkpoint(tmp_path)
    shutil.move(RunDir.checkpoint_plan(checkpoint), RunDir(tmp_path).plan_file)
    with pytest.raises(RecipeError) as caught:
        check_resume(plan_for(tmp_path, "method.alpha=8"), restart=False)
    assert [p.path for p in caught.value.problems] == ["method.alpha"]
