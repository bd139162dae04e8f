"""Settings a recipe can now say, as the rank receives them: the trainer's arguments built
from the plan (launcher/train/args.py) and, where DeepSpeed does the work, its JSON. GPU
plans in fp32, built without launching anything (as tests/train/test_rank_args.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.cli import main

from .conftest import QUICKSTART
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
    liger = plan_for(tmp_path, "model.liger_kernel=true")
    assert common_args(liger, RunDir(liger.run_dir), has_eval=True)["use_liger_kernel"] is True


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


def test_evals_per_epoch_become_a_ratio_of_the_total_steps(tmp_path: Path) -> None:
    """axolotl's evals_per_epoch: 4 per epoch over 2 epochs is every eighth of the run; the
    Trainer turns a ratio below 1 into ceil(total steps x ratio)."""
    args = build(
        plan_for(tmp_path, "train.max_steps=null", "train.epochs=2", "train.evals_per_epoch=4")
    )
    assert args.eval_strategy.value == "steps" and args.eval_steps == 0.125
    import math

    total = 2 * 27  # e.g. 27 optimizer steps per epoch
    assert math.ceil(total * args.eval_steps) == 7  # 27 / 4 rounded up


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        ([], "fp32"),  # peft upcasts LoRA weights
        (["method.kind=qlora"], "bf16"),  # TRL casts QLoRA adapters to bf16
        (["model.dtype=bf16", "train.precision=bf16", "distributed.strategy=zero3"], "bf16"),
        (["method.adapter_dtype=bf16"], "bf16"),  # torchtune's adapters
        (["method.kind=qlora", "method.adapter_dtype=fp32"], "fp32"),
        (["method.kind=full"], None),
    ],
)
def test_the_adapter_dtype_is_decided_in_the_plan(
    tmp_path: Path, sets: list[str], expected: str | None
) -> None:
    plan = plan_for(tmp_path, *sets)
    assert plan.adapter_dtype == expected


def test_no_truncation(tmp_path: Path) -> None:
    """torchtune's max_seq_len: null: TRL keeps every example whole, the plan says what its
    memory estimate assumes instead (the model's context length)."""
    plan = plan_for(tmp_path, "data.max_seq_len=null")
    args = build(plan)
    assert args.max_length is None
    assert any("no truncation" in w for w in plan.warnings)
    assert plan.model_shape is not None and plan.memory is not None
    context = plan.model_shape["max_position_embeddings"]
    longer = plan_for(tmp_path, f"data.max_seq_len={context}")
    assert longer.memory is not None
    assert plan.memory["per_gpu_gib"] == longer.memory["per_gpu_gib"]


def test_zero3_without_overlapping_communication(tmp_path: Path) -> None:
    """LLaMA-Factory's ds_z3_config.json says overlap_comm: false."""
    plan = plan_for(tmp_path, "distributed.strategy=zero3", "distributed.overlap_comm=false")
    assert plan.deepspeed is not None
    assert plan.deepspeed["zero_optimization"]["overlap_comm"] is False
    default = plan_for(tmp_path, "distributed.strategy=zero3")
    assert default.deepspeed is not None
    assert default.deepspeed["zero_optimization"]["overlap_comm"] is True


def test_oumi_loader_settings(tmp_path: Path) -> None:
    """oumi's dataloader_num_workers: auto (2 per GPU, at most 8 and a quarter of the CPUs),
    dataloader_prefetch_factor, empty_device_cache_steps, ddp_find_unused_parameters."""
    from launcher.config.plan import dataloader_workers_for
    from launcher.config.recipe import load_recipe

    sets = ["train.dataloader_workers=auto", "train.dataloader_prefetch_factor=32"]
    plan = plan_for(tmp_path, *sets, "train.empty_cache_steps=50", "resources.cpus_per_node=64")
    args = build(plan)
    assert plan.dataloader_workers == args.dataloader_num_workers == 4  # 2 x 2 processes
    assert args.dataloader_prefetch_factor == 32 and args.torch_empty_cache_steps == 50
    recipe = load_recipe(QUICKSTART, ["train.dataloader_workers=auto", "resources.gpus_per_node=8"])
    assert dataloader_workers_for(recipe, 64) == 8  # at most 8
    assert dataloader_workers_for(recipe, 12) == 3  # a quarter of the CPUs
    assert dataloader_workers_for(recipe, 2) == 1  # at least one


def test_fsdp1_settings_reach_the_trainer_and_accelerate(tmp_path: Path) -> None:
    """axolotl's and LLaMA-Factory's accelerate FSDP1 settings, HYBRID_SHARD (oumi): rendered
    into the fsdp_config the rank passes to its TrainingArguments (which builds accelerate's
    FSDP plugin from it) and into accelerate.yaml; FSDP2 keeps its one sharding setting."""
    sets = [
        "distributed.strategy=fsdp",
        "distributed.fsdp.version=1",
        "distributed.fsdp.sharding=hybrid_shard",
        "distributed.fsdp.forward_prefetch=true",
        "distributed.fsdp.use_orig_params=false",
        "distributed.fsdp.backward_prefetch=BACKWARD_POST",
    ]
    plan = plan_for(tmp_path, *sets)
    assert plan.fsdp is not None
    config = plan.fsdp["fsdp_config"]
    assert config["version"] == 1 and config["reshard_after_forward"] == "hybrid_shard"
    assert config["forward_prefetch"] is True and config["use_orig_params"] is False
    assert config["backward_prefetch"] == "BACKWARD_POST" and config["limit_all_gathers"] is True
    assert any("FSDP1 is deprecated" in w for w in plan.warnings)
    section = plan.accelerate["fsdp_config"]
    assert section["fsdp_version"] == 1 and section["fsdp_forward_prefetch"] is True
    # what the rank's TrainingArguments hand accelerate's FSDP plugin (building the plugin
    # itself needs a GPU)
    plugin = build(plan).fsdp_plugin_args
    assert plugin["fsdp_version"] == 1 and plugin["reshard_after_forward"] == "hybrid_shard"
    assert plugin["forward_prefetch"] is True and plugin["use_orig_params"] is False
    assert plugin["backward_prefetch"] == "BACKWARD_POST" and plugin["limit_all_gathers"] is True
    fsdp2 = plan_for(
        tmp_path, "distributed.strategy=fsdp", "distributed.fsdp.sharding=shard_grad_op"
    )
    assert fsdp2.fsdp is not None
    assert fsdp2.fsdp["fsdp_config"]["reshard_after_forward"] is False
    assert "forward_prefetch" not in fsdp2.fsdp["fsdp_config"]


def test_a_target_module_the_model_lacks_is_refused_by_name(tmp_path: Path) -> None:
    """peft adapts the names it finds and drops the others silently (oumi's Phi-3 KTO config
    names q_proj on a model with a fused qkv_proj); the rank refuses before training."""
    import transformers

    from launcher.errors import RecipeError
    from launcher.tiny import write_tiny
    from launcher.train.peft_configs import peft_config

    model = transformers.AutoModelForCausalLM.from_pretrained(write_tiny("llama", tmp_path / "m"))
    plan = plan_for(tmp_path, "method.target_modules=[q_proj,qkv_proj,gate_up_proj]")
    with pytest.raises(RecipeError) as caught:
        peft_config(plan, model)
    (problem,) = caught.value.problems
    assert problem.path == "method.target_modules"
    assert problem.message.startswith("qkv_proj, gate_up_proj: no module of llama")
    assert "q_proj" in problem.fix and "down_proj" in problem.fix
    assert peft_config(plan_for(tmp_path, "method.target_modules=[q_proj,v_proj]"), model)


@pytest.mark.parametrize(
    ("overrides", "strategy", "fate"),
    [
        # raw text under FlashAttention: a long document goes on in further blocks
        (["data.format=text", "model.attn_implementation=flash_attention_2"], "bfd_split", "rest"),
        # chat data: best fit cuts an over-long example (data.max_seq_len's truncation)
        (["model.attn_implementation=flash_attention_2"], "bfd", "truncated"),
        # no FlashAttention: examples wrapped across blocks, nothing cut
        (["data.format=text"], "wrapped", "rest"),
    ],
)
def test_packing_keeps_long_documents_of_raw_text(
    tmp_path: Path, overrides: list[str], strategy: str, fate: str
) -> None:
    from launcher.data.rows import over_long_fate

    plan = plan_for(tmp_path, "data.packing=true", *overrides)
    args = build(plan)
    assert args.packing and args.packing_strategy == strategy
    # what the data report says of the examples longer than max_seq_len
    assert fate in over_long_fate(True, strategy)
    assert over_long_fate(False, strategy) == "truncated"
