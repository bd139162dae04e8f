"""Sweep grids and workflow files, without training (launcher/workflow/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.errors import RecipeError
from launcher.workflow.stages import check_stages, load_stages, stage_plan
from launcher.workflow.variants import expand, parse_grids

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
THREE_STAGE = ROOT / "recipes" / "cpu" / "three_stage.yaml"


def test_grid_values_split_on_commas_outside_brackets() -> None:
    grids = parse_grids(["method.r=4,16", "method.target_modules=[q_proj,v_proj],all-linear"])
    assert grids == [
        ("method.r", ["4", "16"]),
        ("method.target_modules", ["[q_proj,v_proj]", "all-linear"]),
    ]


def test_bad_grids_are_listed_together() -> None:
    with pytest.raises(RecipeError) as caught:
        parse_grids(["method.r", "train.seed=1", "train.seed=2"])
    paths = [p.path for p in caught.value.problems]
    assert paths == ["--grid method.r", "--grid train.seed"]


def test_combinations_that_train_the_same_thing_collapse() -> None:
    grids = parse_grids(["method.r=4,16", "method.kind=lora,full,qlora"])
    variants = expand(QUICKSTART, grids, [])
    names = [v.name for v in variants]
    assert names == [
        "r=4_kind=lora",
        "kind=full",
        "r=4_kind=qlora",
        "r=16_kind=lora",
        "r=16_kind=qlora",
    ]
    full = variants[1]
    assert full.overrides == ["method.kind=full"] and full.same_as == ["r=16_kind=full"]


def test_a_grid_value_the_recipe_refuses_is_named_with_its_combination() -> None:
    with pytest.raises(RecipeError) as caught:
        expand(QUICKSTART, parse_grids(["method.r=4,0"]), [])
    assert any("method.r=0" in p.path for p in caught.value.problems)


def test_stages_merge_the_shared_sections(tmp_path: Path) -> None:
    name, stages = load_stages(THREE_STAGE)
    assert name == "three-stage" and [n for n, _ in stages] == ["cpt", "sft", "dpo"]
    cpt, sft, dpo = (s for _, s in stages)
    assert cpt["name"] == "three-stage-cpt" and cpt["method"] == {"kind": "full"}
    assert sft["train"]["max_steps"] == 150 and sft["train"]["micro_batch_size"] == 4
    assert dpo["serve"]["enabled"] is True and cpt["serve"]["enabled"] is False
    plan = stage_plan(THREE_STAGE, tmp_path, [], check_stages(THREE_STAGE, []), 0)
    assert plan.run_dir == str(tmp_path / "stages" / "0-cpt")
    assert plan.recipe.merge.enabled  # the next stage starts from its result


def test_a_bad_stage_is_named(tmp_path: Path) -> None:
    workflow = tmp_path / "w.yaml"
    workflow.write_text(
        THREE_STAGE.read_text().replace("format: preference", "format: prefrence"),
        encoding="utf-8",
    )
    with pytest.raises(RecipeError) as caught:
        check_stages(workflow, [])
    assert [p.path for p in caught.value.problems] == ["stages[2] (dpo): data.format"]


@pytest.mark.parametrize("name", ["cpu/three_stage.yaml", "llama8b_three_stage.yaml"])
def test_shipped_workflows_dry_run_their_first_stage(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from launcher.cli import main

    path = ROOT / "recipes" / name
    assert path.read_text().splitlines()[0] == f"# tune-launch recipes/{name}"
    assert main(["run", str(path), "--dry-run", "--run-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "=== stage 1/3: cpt" in out and "=== stage 3/3: dpo" in out
    assert out.count("planned when the previous stage has finished") == 2
    assert (tmp_path / "stages" / "0-cpt" / "plan.json").is_file()
