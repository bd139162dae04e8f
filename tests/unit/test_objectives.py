"""The training objectives (launcher/config/methods.py OBJECTIVES): what the plan decides, what
the rank builds from it (the TRL config and trainer class, without launching anything), the
rows each new format accepts or refuses by line, and the settings refused with exit 2."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from launcher.cli import main
from launcher.config.methods import OBJECTIVES, objective_of
from launcher.config.plan import ClusterFacts, Plan, resolve
from launcher.config.recipe import load_recipe, localize
from launcher.config.schema import Recipe
from launcher.data.formats import FORMATS
from launcher.data.rows import load_splits
from launcher.errors import RecipeError
from launcher.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]
CPU = ROOT / "recipes" / "cpu"
NEW = ("kto", "orpo", "reward", "dpo", "cpt")


def plan_of(name: str, tmp_path: Path, *overrides: str) -> Plan:
    path = CPU / f"{name}.yaml"
    recipe = localize(load_recipe(path, list(overrides)), path.parent)
    return resolve(recipe, ClusterFacts(run_dir=str(tmp_path / name), python=sys.executable))


def rank_args(plan: Plan) -> Any:
    """The rank's arguments object, this process left as it was (accelerate's state)."""
    from accelerate.state import AcceleratorState

    from launcher.train.args import training_args

    with mock.patch.dict(os.environ):
        try:
            return training_args(plan, RunDir(plan.run_dir), has_eval=True)
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)


def test_the_new_cpu_recipes_and_the_8b_kto_recipe_are_shipped() -> None:
    for name in NEW:
        assert (CPU / f"{name}.yaml").read_text().startswith(f"# tune-launch recipes/cpu/{name}")
    assert (ROOT / "recipes" / "llama8b_kto.yaml").is_file()


def test_every_format_trains_an_objective_and_preference_pairs_choose_theirs() -> None:
    """Only preference pairs have several (train.preference_loss names them)."""
    for name in FORMATS:
        owners = [o.name for o in OBJECTIVES.values() if name in o.formats]
        expected = ["dpo", "orpo", "simpo"] if name == "preference" else owners[:1]
        assert owners == expected, (name, owners)
    loss = Recipe.model_fields["train"].annotation.model_fields["preference_loss"].annotation
    assert set(loss.__args__) == {"dpo", "orpo", "simpo"}


@pytest.mark.parametrize(
    ("name", "overrides", "config", "trainer", "fields"),
    [
        ("dpo", [], "DPOConfig", "DPOTrainer", {"beta": 0.1, "max_length": 64}),
        ("orpo", [], "ORPOConfig", "ORPOTrainer", {"beta": 0.1, "max_length": 64}),
        (
            "orpo",
            ["train.preference_loss=simpo", "train.dpo_beta=2.0", "train.simpo_gamma=0.8"],
            "CPOConfig",
            "CPOTrainer",
            {"beta": 2.0, "loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": 0.8},
        ),
        ("kto", [], "KTOConfig", "KTOTrainer", {"beta": 0.1, "max_length": 64}),
        (  # axolotl's kto example: rl_beta 0.5, kto_desirable_weight 0.2
            "kto",
            ["train.dpo_beta=0.5", "train.kto_desirable_weight=0.2"],
            "KTOConfig",
            "KTOTrainer",
            {"beta": 0.5, "desirable_weight": 0.2, "undesirable_weight": 1.0},
        ),
        (  # LLaMA-Factory's KTO: one row per micro-batch, KL partners across the data
            "kto",
            ["train.micro_batch_size=1", "train.kto_kl_pairing=previous_row"],
            "KTOConfig",
            "KTOTrainer",
            {"per_device_train_batch_size": 1, "train_sampling_strategy": "random"},
        ),
        ("kto", [], "KTOConfig", "KTOTrainer", {"train_sampling_strategy": "sequential"}),
        ("reward", [], "RewardConfig", "RewardTrainer", {"max_length": 64}),
        ("cpt", [], "SFTConfig", "SFTTrainer", {"packing": True, "max_length": 32}),
    ],
)
def test_the_rank_builds_the_plans_objective(
    name: str,
    overrides: list[str],
    config: str,
    trainer: str,
    fields: dict[str, Any],
    tmp_path: Path,
) -> None:
    from launcher.train.trainers import trl_trainer

    # a GPU plan: a CPU plan's arguments (gloo) need the process group a rank has formed
    plan = plan_of(name, tmp_path, "resources.accelerator=gpu", *overrides)
    # the plan decides once; plan.json carries it to the rank
    again = Plan.model_validate_json(plan.model_dump_json())
    assert (again.objective, again.objective_args) == (plan.objective, plan.objective_args)
    args = rank_args(again)
    assert type(args).__name__ == config
    for key, value in fields.items():
        assert getattr(args, key) == value, key
    assert args.learning_rate == plan.recipe.train.learning_rate
    assert args.per_device_train_batch_size == plan.micro_batch_size
    # the class or its subclass (the reward trainer's truncation: launcher/train/reward.py)
    assert trainer in [cls.__name__ for cls in trl_trainer(plan.objective).__mro__]


def test_kto_rows_are_validated_by_line(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Is it good?", "completion": "yes", "label": True},
        {"prompt": "Is it good?", "completion": "no"},
        {"prompt": "Is it good?", "completion": "no", "label": "false"},
        {"prompt": "Is it good?", "completion": " ", "label": False},
        {"prompt": [{"role": "user", "content": "Hi"}], "completion": "Hello", "label": False},
    ]
    path = tmp_path / "k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = Recipe.model_validate(
        {"name": "k", "model": {"name_or_path": "tiny:llama"},
         "data": {"train": str(path), "format": "kto"}}
    )  # fmt: skip
    with pytest.raises(RecipeError) as caught:
        load_splits(recipe)
    text = caught.value.render()
    assert "k.jsonl:2" in text and "missing field 'label'" in text
    assert "k.jsonl:3" in text and "'label' must be true or false" in text
    assert "k.jsonl:4" in text and "empty 'completion'" in text
    assert "k.jsonl:1" not in text and "k.jsonl:5" not in text

    path.write_text("".join(json.dumps(r) + "\n" for r in (rows[0], rows[4])))
    train = load_splits(recipe).train
    assert train[1] == {
        "prompt": [{"role": "user", "content": "Hi"}],
        "completion": [{"role": "assistant", "content": "Hello"}],
        "label": False,
    }


def test_reward_rows_are_preference_pairs(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    rows = [{"prompt": "Q?", "chosen": "a", "rejected": "b"}, {"prompt": "Q?", "chosen": "a"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = Recipe.model_validate(
        {"name": "r", "model": {"name_or_path": "tiny:llama", "task": "sequence_classification",
                                "num_labels": 1},
         "data": {"train": str(path), "format": "reward"}}
    )  # fmt: skip
    assert objective_of(recipe) == "reward"
    with pytest.raises(RecipeError) as caught:
        load_splits(recipe)
    assert "r.jsonl:2" in caught.value.render() and "missing field 'rejected'" in (
        caught.value.render()
    )


@pytest.mark.parametrize(
    ("name", "overrides", "field"),
    [
        ("cpt", ["train.preference_loss=orpo"], "train.preference_loss"),
        ("dpo", ["train.simpo_gamma=0.3"], "train.simpo_gamma"),
        ("reward", ["model.num_labels=2"], "model.num_labels"),
        (
            "kto",
            ["train.micro_batch_size=1", "train.global_batch_size=2"],
            "train.micro_batch_size",
        ),
        ("dpo", ["train.kto_kl_pairing=previous_row"], "train.kto_kl_pairing"),
        (
            "kto",
            ["train.kto_kl_pairing=previous_row", "distributed.strategy=zero2"],
            "train.kto_kl_pairing",
        ),
        ("reward", ["data.format=classification"], "model.num_labels"),
    ],
)
def test_settings_that_cannot_be_honoured_exit_2_naming_the_field(
    name: str,
    overrides: list[str],
    field: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["plan", str(CPU / f"{name}.yaml")]
    for assignment in overrides:
        argv += ["--set", assignment]
    assert main(argv) == 2
    assert field in capsys.readouterr().err


def test_a_plan_written_before_objectives_were_planned_reads_the_recipes(tmp_path: Path) -> None:
    """A run started by an older tune-launch (plan.json without `objective`) and resumed by
    this one must not fall back to SFT on its preference rows."""
    plan = plan_of("kto", tmp_path)
    older = json.loads(plan.model_dump_json())
    del older["objective"], older["objective_args"]
    again = Plan.model_validate_json(json.dumps(older))
    assert (again.objective, again.objective_args) == ("kto", plan.objective_args)


def test_every_objectives_trainer_and_config_classes_import() -> None:
    """Objective.trainer / .config name classes that exist (the rank imports them by path)."""
    import importlib

    from launcher.config.methods import OBJECTIVES

    for objective in OBJECTIVES.values():
        for path in (objective.trainer, objective.config):
            module, _, name = path.rpartition(".")
            assert isinstance(getattr(importlib.import_module(module), name), type), path
