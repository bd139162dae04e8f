"""Settings a recipe can now say, as the rank receives them: the trainer's arguments built
from the plan (launcher/train/args.py) and, where DeepSpeed does the work, its JSON. GPU
plans in fp32, built without launching anything (as tests/train/test_rank_args.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.cli import main

from .test_rank_args import build, plan_for


def test_fused_adamw_reaches_the_trainer(tmp_path: Path) -> None:
    args = build(plan_for(tmp_path, "train.optimizer=adamw_torch_fused"))
    assert args.optim.value == "adamw_torch_fused"


def test_dataloader_and_preprocessing_workers(tmp_path: Path) -> None:
    args = build(plan_for(tmp_path, "train.dataloader_workers=3", "data.num_proc=4"))
    assert args.dataloader_num_workers == 3
    assert args.dataset_num_proc == 4  # TRL's tokenizing / packing processes
    default = build(plan_for(tmp_path))
    assert default.dataloader_num_workers == 0 and default.dataset_num_proc is None


@pytest.mark.parametrize("off", ["0", "null"])
def test_no_gradient_clipping(tmp_path: Path, off: str) -> None:
    zero2 = plan_for(tmp_path, f"train.max_grad_norm={off}", "distributed.strategy=zero2")
    assert zero2.deepspeed is not None and zero2.deepspeed["gradient_clipping"] == 0.0
    args = build(plan_for(tmp_path, f"train.max_grad_norm={off}"))
    assert args.max_grad_norm == 0.0  # the Trainer clips only when it is > 0


def test_warmup_in_steps(tmp_path: Path) -> None:
    args = build(plan_for(tmp_path, "train.warmup_steps=7", "train.warmup_ratio=0"))
    assert args.warmup_steps == 7 and args.get_warmup_steps(300) == 7
    ratio = build(plan_for(tmp_path))  # the quickstart's warmup_ratio 0.05 of 300 steps
    assert ratio.get_warmup_steps(300) == 15


def test_per_epoch_eval_and_save(tmp_path: Path) -> None:
    args = build(plan_for(tmp_path, "train.save_strategy=epoch"))
    assert args.save_strategy.value == "epoch" and args.eval_strategy.value == "epoch"
    mixed = build(plan_for(tmp_path, "train.eval_strategy=epoch"))
    assert mixed.save_strategy.value == "steps" and mixed.eval_strategy.value == "epoch"


def test_trackers_off(tmp_path: Path) -> None:
    assert build(plan_for(tmp_path, "train.trackers=[]")).report_to == []
    assert build(plan_for(tmp_path)).report_to == ["tensorboard"]


def test_tf32_and_compile_reach_a_gpu_rank(tmp_path: Path) -> None:
    from launcher.config.plan import Plan

    plan = plan_for(tmp_path, "train.tf32=true", "train.torch_compile=true")
    assert isinstance(plan, Plan)
    from launcher.rundir import RunDir
    from launcher.train.args import common_args

    # TrainingArguments itself refuses tf32 without CUDA: what the rank passes is checked
    common = common_args(plan, RunDir(plan.run_dir), has_eval=True)
    assert common["tf32"] is True and common["torch_compile"] is True


def test_gpu_settings_on_cpu_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"
    argv = ["plan", str(recipe), "--set", "train.tf32=true", "--set", "train.torch_compile=true"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "train.tf32" in err and "train.torch_compile" in err


def test_max_samples_caps_the_training_rows(tmp_path: Path) -> None:
    from launcher.data.rows import load_splits

    plan = plan_for(tmp_path, "data.max_samples=50")
    splits = load_splits(plan.recipe)
    assert len(splits.train) == 50
    assert len(splits.validation) == 48  # the quickstart's 10% of 480, before the cap
