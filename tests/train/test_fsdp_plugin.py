"""FSDP under the default torchrun launcher: the rank's TrainingArguments build the FSDP
plugin that transformers' Trainer hands to accelerate (which then wraps the model with FSDP2
instead of DDP), wrapping the model's own block class. FSDP cannot run on CPU
(../shared/ENVIRONMENT.md), so the plugin is built here with accelerate's real class, and a
recipe that would run FSDP as anything else is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.cli import main

from .test_rank_args import build, plan_for


def test_torchrun_rank_builds_accelerates_fsdp2_plugin(tmp_path: Path) -> None:
    from accelerate import FullyShardedDataParallelPlugin

    plan = plan_for(
        tmp_path,
        "model.name_or_path=Qwen/Qwen2.5-0.5B",
        "model.architecture=qwen2.5-0.5b",
        "distributed.strategy=fsdp",
    )
    assert "torch.distributed.run" in plan.launch  # the default launcher
    args = build(plan)
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    assert plugin.fsdp_version == 2
    assert plugin.transformer_cls_names_to_wrap == ["Qwen2DecoderLayer"]
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    # the memory plan's assumption holds: weights, gradients and states are sharded
    assert plan.memory is not None
    assert plan.memory["breakdown_gib"]["weights"] < plan.memory["weight_bytes"] / 2**30


def test_fsdp_that_would_run_as_ddp_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"
    argv = ["run", str(recipe), "--dry-run", "--run-dir", str(tmp_path / "run")]
    # on CPU hosts accelerate's FSDP2 silently trains DDP: refused
    assert main([*argv, "--set", "distributed.strategy=fsdp"]) == 2
    err = capsys.readouterr().err
    assert "distributed.strategy" in err and "FSDP does not run on CPU hosts" in err
