"""Resuming a streamed run (launcher/config/resume_stream.py, through launcher/resume.py's
check before any process starts, and the rank's own check for a restart): what a stream
cannot find its place under is refused, naming the field. On run directories written by
hand; the real interrupted and resumed streamed run is in tests/train/test_objectives_run.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.config.plan import ClusterFacts, Plan, resolve
from launcher.config.recipe import load_recipe, localize
from launcher.errors import RecipeError
from launcher.resume import check_resume
from launcher.rundir import Checkpoint, RunDir
from launcher.train.resume import check_stream_position

ROOT = Path(__file__).resolve().parents[2]
CPT = ROOT / "recipes" / "cpu" / "cpt.yaml"
STREAMED = ("data.streaming=true", "data.val_split=0", "train.max_steps=12")


def plan_for(run_dir: Path, *sets: str, gpus: int | None = None) -> Plan:
    recipe = localize(load_recipe(CPT, list(sets), gpus_per_node=gpus), CPT.parent)
    return resolve(recipe, ClusterFacts(run_dir=str(run_dir), python="python", cpus=2))


def with_checkpoint(run_dir: Path, *sets: str, epoch: float = 0.5) -> Path:
    """A run directory whose checkpoint of step 6 was trained under cpt.yaml with `sets`, the
    Trainer's epoch then `epoch`."""
    plan = plan_for(run_dir, *sets)
    checkpoint = RunDir(run_dir).checkpoint(6)
    checkpoint.mkdir(parents=True)
    RunDir.checkpoint_plan(checkpoint).write_text(plan.model_dump_json())
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 6, "epoch": epoch}))
    RunDir.mark_complete(checkpoint, {"step": 6})
    return checkpoint


def refused(plan: Plan) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        check_resume(plan, restart=False)
    assert "cannot resume" in caught.value.render()
    assert not RunDir(plan.run_dir).plan_file.exists()  # nothing of this run was written
    return [p.path for p in caught.value.problems]


def test_the_same_streamed_recipe_resumes(tmp_path: Path) -> None:
    checkpoint = with_checkpoint(tmp_path, *STREAMED)
    resumed = check_resume(plan_for(tmp_path, *STREAMED, "train.max_steps=20"), restart=False)
    assert resumed is not None and resumed.path == checkpoint


@pytest.mark.parametrize(
    "trained,asked",
    [(STREAMED, ("data.val_split=0", "train.max_steps=12")), (("data.val_split=0",), STREAMED)],
)
def test_switching_data_streaming_is_refused(
    trained: tuple[str, ...], asked: tuple[str, ...], tmp_path: Path
) -> None:
    with_checkpoint(tmp_path, *trained)
    assert refused(plan_for(tmp_path, *asked)) == ["data.streaming"]


@pytest.mark.parametrize(
    "change,field",
    [
        ("data.shuffle_buffer=100", "data.shuffle_buffer"),
        ("data.seed=7", "data.seed"),
        ("data.train=../data/reviews_text_eval.jsonl", "data.train"),
    ],
)
def test_a_new_order_or_source_of_the_stream_is_refused(
    change: str, field: str, tmp_path: Path
) -> None:
    with_checkpoint(tmp_path, *STREAMED)
    assert refused(plan_for(tmp_path, *STREAMED, change)) == [field]


def test_a_checkpoint_from_before_streaming_existed_is_refused(tmp_path: Path) -> None:
    checkpoint = with_checkpoint(tmp_path, "data.val_split=0")
    copy = RunDir.checkpoint_plan(checkpoint)
    old = json.loads(copy.read_text())
    del old["recipe"]["data"]["streaming"], old["recipe"]["data"]["shuffle_buffer"]
    del old["stream"]
    copy.write_text(json.dumps(old))
    with pytest.raises(RecipeError) as caught:
        check_resume(plan_for(tmp_path, *STREAMED), restart=False)
    [problem] = caught.value.problems
    assert problem.path == "data.streaming" and "before data.streaming existed" in problem.message
    assert "--set data.streaming=false" in problem.fix


def test_a_new_default_shuffle_buffer_is_refused(tmp_path: Path) -> None:
    """The recipe is the same, the plan's resolved buffer is not (another version's default)."""
    checkpoint = with_checkpoint(tmp_path, *STREAMED)
    copy = RunDir.checkpoint_plan(checkpoint)
    old = json.loads(copy.read_text())
    old["stream"]["shuffle_buffer"] = 5000
    copy.write_text(json.dumps(old))
    with pytest.raises(RecipeError) as caught:
        check_resume(plan_for(tmp_path, *STREAMED), restart=False)
    [problem] = caught.value.problems
    assert problem.path == "data.shuffle_buffer" and "--set data.shuffle_buffer=5000" in problem.fix


def test_a_checkpoint_past_the_first_pass_is_refused_here_and_on_the_rank(tmp_path: Path) -> None:
    checkpoint = with_checkpoint(tmp_path, *STREAMED, epoch=1.25)
    plan = plan_for(tmp_path, *STREAMED)
    assert refused(plan) == ["data.streaming"]
    with pytest.raises(RecipeError) as caught:  # a restart or requeue the launcher never saw
        check_stream_position(plan, Checkpoint(6, checkpoint, True))
    assert "past the end of the stream" in caught.value.render()


@pytest.mark.parametrize("epoch", [0.5, 1.0])  # 1.0: a run that ended at max_steps in pass 1
def test_a_checkpoint_within_the_first_pass_resumes(epoch: float, tmp_path: Path) -> None:
    checkpoint = with_checkpoint(tmp_path, *STREAMED, epoch=epoch)
    plan = plan_for(tmp_path, *STREAMED, "train.max_steps=24")
    assert check_resume(plan, restart=False) is not None
    check_stream_position(plan, Checkpoint(6, checkpoint, True))


def test_a_new_world_size_is_refused_for_a_stream(tmp_path: Path) -> None:
    with_checkpoint(tmp_path, *STREAMED)
    assert refused(plan_for(tmp_path, *STREAMED, gpus=1)) == ["resources.gpus_per_node"]


def test_new_dataloader_workers_are_refused_for_a_stream_of_several_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_checkpoint(tmp_path, *STREAMED)
    plan = plan_for(tmp_path, *STREAMED, "train.dataloader_workers=2")
    assert check_resume(plan, restart=False) is not None  # a local file: one shard, one reader
    monkeypatch.setattr("launcher.resume.shard_count", lambda recipe: 4)  # a hub dataset's files
    assert refused(plan) == ["train.dataloader_workers"]
