"""The rank's trainer arguments come from the plan alone (launcher/train/args.py): built here
without launching anything. FSDP cannot run on CPU, so its rank-side arguments are checked
here, as a rank started by torchrun would build them.

The plans are GPU plans in fp32: a CPU plan's arguments (gloo) and DeepSpeed's need the
process group a rank has formed, so those are exercised by the real runs of test_train_runs.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from launcher.config.plan import ClusterFacts, Plan, resolve
from launcher.config.recipe import load_recipe, localize
from launcher.rundir import RunDir
from launcher.train.args import training_args

from .conftest import QUICKSTART


def plan_for(tmp_path: Path, *overrides: str) -> Plan:
    """The quickstart on 2 GPUs, DDP and fp32 unless overridden."""
    gpu = ["resources.accelerator=gpu", "resources.gpus_per_node=2", "distributed.strategy=ddp"]
    fp32 = ["train.precision=fp32", "model.dtype=fp32"]
    recipe = load_recipe(QUICKSTART, [*gpu, *fp32, *overrides])
    recipe = localize(recipe, QUICKSTART.parent)
    return resolve(recipe, ClusterFacts(run_dir=str(tmp_path / "run"), python=sys.executable))


def build(plan: Plan, has_eval: bool = True) -> Any:
    """The arguments, leaving this process as it was: TrainingArguments sets ACCELERATE_*
    variables and accelerate's process-wide state (reset as transformers' own tests do)."""
    from accelerate.state import AcceleratorState

    with mock.patch.dict(os.environ):
        try:
            return training_args(plan, RunDir(plan.run_dir), has_eval=has_eval)
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)


def test_fsdp_under_torchrun_reaches_the_training_arguments(tmp_path: Path) -> None:
    plan = plan_for(tmp_path, "distributed.strategy=fsdp", "distributed.launcher=torchrun")
    assert plan.fsdp is not None and plan.deepspeed is None
    resolved = plan.model_dump_json()
    args = build(plan)
    assert args.fsdp, "FSDP must be on in the TrainingArguments, or torchrun trains DDP"
    assert args.fsdp_config["version"] == 2
    assert args.fsdp_config["transformer_layer_cls_to_wrap"] == [
        plan.fsdp["fsdp_config"]["transformer_layer_cls_to_wrap"][0]
    ]
    assert plan.model_dump_json() == resolved, "building the arguments changed the plan"
    assert args.deepspeed is None and not args.use_cpu


def test_ddp_carries_no_fsdp_and_the_plans_batch_and_eval_steps(tmp_path: Path) -> None:
    plan = plan_for(tmp_path, "train.save_steps=7")
    args = build(plan)
    assert not args.fsdp and args.deepspeed is None
    assert args.per_device_train_batch_size == plan.micro_batch_size
    assert args.gradient_accumulation_steps == plan.gradient_accumulation_steps
    assert args.eval_steps == plan.eval_steps == 7
    assert args.output_dir == str(RunDir(plan.run_dir).checkpoints)
    assert build(plan, has_eval=False).eval_strategy == "no"


@pytest.mark.parametrize(
    "overrides,kind",
    [
        ([], "SFTConfig"),
        (["data.format=preference"], "DPOConfig"),
        (
            [
                "data.format=classification",
                "model.task=sequence_classification",
                "model.num_labels=2",
                "serve.enabled=false",
                "eval.enabled=false",
            ],
            "TrainingArguments",
        ),
    ],
)
def test_the_formats_trainer_picks_the_arguments(
    tmp_path: Path, overrides: list[str], kind: str
) -> None:
    args = build(plan_for(tmp_path, *overrides))
    assert type(args).__name__ == kind
