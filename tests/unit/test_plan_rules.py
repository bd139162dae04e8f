"""The plan's rules and resolved values: every rule refuses some broken recipe, FSDP reaches
the rank's TrainingArguments and accelerate.yaml from one set of values, defaults the rank
needs are resolved in the plan."""

from __future__ import annotations

import copy
import typing
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.config import rules
from launcher.config.plan import ClusterFacts, Plan, resolve
from launcher.config.recipe import DataConfig, load_recipe, time_minutes
from launcher.data.formats import FORMATS
from launcher.errors import RecipeError
from launcher.plan_files import write_plan
from launcher.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]
BROKEN = sorted((Path(__file__).parent / "broken").glob("*.yaml"))
DATA = f"{ROOT}/recipes/data/quickstart_train.jsonl"


def _plan(tmp_path: Path, body: str, *overrides: str) -> Plan:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"name: t\ndata: {{train: {DATA}}}\n{body}")
    recipe = load_recipe(path, list(overrides))
    return resolve(recipe, ClusterFacts(run_dir=str(tmp_path / "run")))


def _record(checks: list, fired: set[str]) -> list:  # type: ignore[type-arg]
    """The same checks, noting the name of each one that finds something."""

    def recording(check):  # type: ignore[no-untyped-def]
        def run(candidate: rules.Candidate) -> list:  # type: ignore[type-arg]
            found = check(candidate)
            if found:
                fired.add(check.__name__)
            return found

        return run

    return [recording(check) for check in checks]


def test_every_rule_refuses_a_recipe_of_the_broken_corpus(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fired: set[str] = set()
    every = {rule.__name__ for rule in rules.RULES}
    monkeypatch.setattr(rules, "RULES", _record(rules.RULES, fired))
    for path in BROKEN:
        main(["plan", str(path)])
    capsys.readouterr()
    assert fired == every, f"no broken recipe reaches {sorted(every - fired)}"


def test_every_advice_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fired: set[str] = set()
    every = {advice.__name__ for advice in rules.ADVICE}
    monkeypatch.setattr(rules, "ADVICE", _record(rules.ADVICE, fired))
    plan = _plan(
        tmp_path,
        "model: {name_or_path: some-org/unknown-model}\n"
        "train: {max_steps: 5, save_steps: 10}\n"
        "serve: {engine: vllm-cpu}\n",
    )
    assert len(plan.warnings) == 3
    assert "serve.engine=vllm-cpu on a GPU cluster" in plan.warnings[0]
    assert "save_steps=10 > max_steps=5" in plan.warnings[1]
    assert "model shape unknown offline" in plan.warnings[2]
    saved = _plan(tmp_path, "model: {name_or_path: tiny:llama}\n", "method.modules_to_save=[head]")
    assert saved.warnings == [
        "method.modules_to_save: 'head' is not a module the memory planner knows; "
        "the estimate leaves its trainable copy out"
    ]
    fsdp1 = _plan(tmp_path, FSDP, "distributed.fsdp.version=1")
    assert any("FSDP1 is deprecated by transformers" in w for w in fsdp1.warnings)
    assert fired == every


FSDP = (
    "model: {name_or_path: Qwen/Qwen2.5-0.5B, architecture: qwen2.5-0.5b}\n"
    "distributed: {strategy: fsdp}\n"
    "resources: {gpus_per_node: 2}\n"
    "train: {global_batch_size: 8}\n"
)


def test_fsdp_reaches_training_arguments_with_the_shapes_block_class(tmp_path: Path) -> None:
    from transformers import TrainingArguments

    plan = _plan(tmp_path, FSDP)
    assert plan.fsdp is not None
    assert plan.fsdp["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["Qwen2DecoderLayer"]
    # the real TrainingArguments turn them into accelerate's FSDP plugin (it mutates the dict)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), **copy.deepcopy(plan.fsdp))
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2
    assert plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert plugin["transformer_cls_names_to_wrap"] == "Qwen2DecoderLayer"
    assert plugin["state_dict_type"] == "FULL_STATE_DICT"  # the Trainer saves the final model


def test_fsdp_settings_in_accelerate_yaml_equal_the_ranks(tmp_path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    plan = _plan(tmp_path, FSDP, "distributed.launcher=accelerate")
    write_plan(plan)
    config = load_config_from_file(str(RunDir(plan.run_dir).accelerate_file))
    assert config.distributed_type == "FSDP"
    section = config.fsdp_config
    rank = plan.fsdp["fsdp_config"]  # type: ignore[index]
    assert section["fsdp_transformer_layer_cls_to_wrap"] == "Qwen2DecoderLayer"
    assert section["fsdp_offload_params"] == rank["cpu_offload"]
    for key in ("version", "reshard_after_forward", "state_dict_type", "cpu_ram_efficient_loading"):
        assert section[f"fsdp_{key}"] == rank[key], key


def test_no_fsdp_settings_for_other_strategies(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "model: {name_or_path: tiny:llama}\n")
    assert plan.fsdp is None and "fsdp_config" not in plan.accelerate


def test_fsdp_without_a_known_shape_is_refused_naming_the_fix(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as err:
        _plan(tmp_path, FSDP.replace(", architecture: qwen2.5-0.5b", ""))
    (problem,) = err.value.problems
    assert problem.path == "distributed.strategy"
    assert "set model.architecture" in problem.fix


def test_eval_steps_default_to_save_steps(tmp_path: Path) -> None:
    body = "model: {name_or_path: tiny:llama}\ntrain: {save_steps: 25}\n"
    assert _plan(tmp_path, body).eval_steps == 25
    assert _plan(tmp_path, body, "train.eval_steps=7").eval_steps == 7


def test_qlora_dtypes_are_resolved_in_the_plan(tmp_path: Path) -> None:
    body = "model: {name_or_path: tiny:llama, dtype: bf16}\nmethod: {kind: qlora}\n"
    plain = _plan(tmp_path, body)
    assert (plain.quant_compute_dtype, plain.quant_storage) == ("bf16", "uint8")
    sharded = _plan(tmp_path, body, "distributed.strategy=zero3", "method.quant.compute_dtype=fp32")
    assert (sharded.quant_compute_dtype, sharded.quant_storage) == ("fp32", "fp32")
    lora = _plan(tmp_path, "model: {name_or_path: tiny:llama}\n")
    assert (lora.quant_compute_dtype, lora.quant_storage) == (None, None)


def test_collective_timeout_travels_in_the_plan_only(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "model: {name_or_path: tiny:llama}\n", "distributed.nccl_timeout_s=77")
    assert plan.recipe.distributed.nccl_timeout_s == 77
    assert "77" not in plan.env.values()  # ranks read it from plan.json, nowhere else


def test_data_format_choices_are_the_registrys() -> None:
    choices = typing.get_args(DataConfig.model_fields["format"].annotation)
    assert set(choices) == set(FORMATS)


def test_time_minutes_reads_slurm_time_formats() -> None:
    assert time_minutes("90") == 90
    assert time_minutes("00:30:00") == 30
    assert time_minutes("01:00:01") == 61
    assert time_minutes("2-00:00:00") == 2880
