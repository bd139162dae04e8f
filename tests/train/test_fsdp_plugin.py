"""FSDP under the default torchrun launcher: the rank's TrainingArguments build the FSDP
plugin that transformers' Trainer hands to accelerate (which then wraps the model with FSDP2
instead of DDP), wrapping the model's own block class. FSDP cannot run on CPU
(accelerate refuses it), so the plugin is built here with accelerate's real class, and a
recipe that would run FSDP as anything else is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


@pytest.mark.parametrize("tied", [False, True])
def test_fsdp2_units_embedding_and_output_apart(tmp_path: Path, tied: bool) -> None:
    """torchtune's custom_sharded_layers [tok_embeddings, output]: accelerate's FSDP2 wrapping
    (fsdp2_prepare_model, >= 1.14) gives the input embedding its own unit and the output
    layer one with the final norm, besides the plan's decoder blocks and the root. Run here
    with the plugin the rank builds and a fully_shard that records its units instead of
    sharding (FSDP cannot run on CPU). Tied embeddings share one unit with the norm."""
    from types import SimpleNamespace
    from unittest import mock

    import torch
    import transformers
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils import fsdp_utils

    from launcher.tiny import write_tiny

    plan = plan_for(tmp_path, "distributed.strategy=fsdp", "method.kind=full")
    plugin = FullyShardedDataParallelPlugin(**build(plan).fsdp_plugin_args)
    config = transformers.AutoConfig.from_pretrained(write_tiny("llama", tmp_path / "m"))
    config.tie_word_embeddings = tied
    model = transformers.AutoModelForCausalLM.from_config(config)
    names = {id(m): n or "<root>" for n, m in model.named_modules()}
    units: list[list[str]] = []

    def record(modules: Any, **kwargs: Any) -> Any:
        group = modules if isinstance(modules, list) else [modules]
        units.append([names[id(m)] for m in group])
        return modules

    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin),
        mixed_precision="no",
        is_main_process=True,
        device=torch.device("cpu"),
    )
    with (
        mock.patch("torch.distributed.fsdp.fully_shard", record),
        mock.patch.object(fsdp_utils, "fsdp2_load_full_state_dict"),
    ):
        fsdp_utils.fsdp2_prepare_model(accelerator, model)
    blocks = [[f"model.layers.{i}"] for i in range(config.num_hidden_layers)]
    if tied:
        assert units == [*blocks, ["model.norm", "model.embed_tokens", "lm_head"], ["<root>"]]
    else:
        assert units == [*blocks, ["model.embed_tokens"], ["model.norm", "lm_head"], ["<root>"]]
