"""data.streaming (launcher/data/stream.py): what the rank receives is a `datasets`
IterableDataset, read as training consumes it; TRL's SFTTrainer packs it into max_seq_len
blocks; accelerate gives each rank its own rows (by shard, or by slices of each global batch);
the data report counts nothing it cannot know; invalid rows stop the run or are dropped as
data.invalid_rows says; a hub dataset streams from the local cache, and one not there stops the
launcher before any process starts. The refusals are recipes in
tests/unit/broken/data_streaming_*.yaml; the real streamed training (2 ranks, loss down) is the
cpt run of tests/train/test_objectives_run.py."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from launcher.config.plan import ClusterFacts, Plan, resolve
from launcher.config.schema import Recipe
from launcher.data.rows import validate_data
from launcher.data.stream import train_stream
from launcher.errors import RecipeError
from launcher.rundir import RunDir

from .test_hub_datasets import COMMIT, hub  # noqa: F401 (the fixture)

ROOT = Path(__file__).resolve().parents[2]
TEXT = ROOT / "recipes" / "data" / "reviews_text.jsonl"
SEQ = 16


def recipe(**data: Any) -> Recipe:
    base = {"train": str(TEXT), "format": "text", "streaming": True, "packing": True,
            "max_seq_len": SEQ, "shuffle_buffer": 0}  # fmt: skip
    return Recipe.model_validate(
        {
            "name": "stream",
            "model": {"name_or_path": "tiny:llama", "dtype": "fp32"},
            "method": {"kind": "full"},
            "data": {**base, **data},
            "train": {
                "max_steps": 8,
                "micro_batch_size": 2,
                "global_batch_size": 2,
                "learning_rate": 1e-3,
                "precision": "fp32",
                "logging_steps": 1,
                "save_steps": 100,
            },
            "distributed": {"strategy": "ddp"},
            "resources": {"accelerator": "cpu", "gpus_per_node": 1},
        }
    )


def plan_of(r: Recipe, run_dir: Path) -> Plan:
    return resolve(r, ClusterFacts(run_dir=str(run_dir)))


def texts(stream: Any) -> list[str]:
    return [row["text"] for row in stream]


def test_the_plan_carries_the_stream_settings(tmp_path: Path) -> None:
    assert plan_of(recipe(shuffle_buffer=None), tmp_path).stream == {
        "shuffle_buffer": 10_000,
        "seed": 42,
    }
    assert plan_of(recipe(seed=7), tmp_path).stream == {"shuffle_buffer": 0, "seed": 7}
    assert plan_of(recipe(streaming=False, shuffle_buffer=None), tmp_path).stream is None


def test_the_stream_is_the_file_in_order_or_shuffled_by_seed(tmp_path: Path) -> None:
    import datasets

    lines = [json.loads(line)["text"] for line in TEXT.read_text().splitlines()]
    plain = train_stream(recipe(), {"shuffle_buffer": 0, "seed": 1})
    assert isinstance(plain, datasets.IterableDataset)
    assert texts(plain) == lines
    shuffled = [texts(train_stream(recipe(), {"shuffle_buffer": 50, "seed": s})) for s in (1, 1, 2)]
    assert shuffled[0] == shuffled[1] != shuffled[2]  # deterministic by seed
    assert sorted(shuffled[0]) == sorted(lines) and shuffled[0] != lines
    capped = train_stream(recipe(max_samples=5), {"shuffle_buffer": 0, "seed": 1})
    assert texts(capped) == lines[:5]


def write_rows(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def test_invalid_rows_stop_the_launcher_or_are_dropped(tmp_path: Path) -> None:
    items = [{"text": f"row {i}"} for i in range(6)]
    items[3] = {"body": "no text column"}
    path = write_rows(tmp_path / "bad.jsonl", items)
    with pytest.raises(RecipeError) as caught:
        validate_data(recipe(train=str(path)))  # the launcher checks the stream's first rows
    assert "bad.jsonl:4" in caught.value.render()
    dropped = train_stream(recipe(train=str(path), invalid_rows="drop"), {"shuffle_buffer": 0,
                                                                           "seed": 1})  # fmt: skip
    assert texts(dropped) == [f"row {i}" for i in (0, 1, 2, 4, 5)]
    strict = train_stream(recipe(train=str(path)), {"shuffle_buffer": 0, "seed": 1})
    with pytest.raises(RecipeError, match="row 4 as this process read the stream"):
        texts(strict)  # past the checked head, a rank stops at the row


def cache_two_shards(hub_dir: Path, name: str) -> None:
    """A hub dataset of two parquet files, as `hf download --repo-type dataset` leaves it."""
    import datasets

    folder = hub_dir / f"datasets--{name.replace('/', '--')}"
    snapshot = folder / "snapshots" / COMMIT / "en"
    snapshot.mkdir(parents=True)
    for shard in range(2):
        items = [{"text": f"doc {shard}-{i} the food was good"} for i in range(20)]
        datasets.Dataset.from_list(items).to_parquet(str(snapshot / f"train-{shard}.parquet"))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)


def rank_rows(dataset: Any, rank: int, collate: Any = None) -> list[Any]:
    """The rows rank `rank` of 2 trains: the DataLoader as the Trainer's accelerator prepares
    it (TRL: dispatch_batches=False for an IterableDataset)."""
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=2, collate_fn=collate or (lambda rows: rows))
    prepared = prepare_data_loader(
        loader, num_processes=2, process_index=rank, put_on_device=False, dispatch_batches=False
    )
    return [row for batch in prepared for row in batch]


def test_a_cached_hub_dataset_streams_each_rank_its_own_files(hub: Path, tmp_path: Path) -> None:  # noqa: F811
    cache_two_shards(hub, "acme/web")
    r = recipe(train=[{"path": "acme/web", "subset": None, "data_dir": "en"}])
    assert validate_data(r)[0].to_dict()["rows"] is None
    stream = train_stream(r, {"shuffle_buffer": 0, "seed": 1})
    assert stream.n_shards == 2
    ranks = [texts(rank_rows(stream, rank)) for rank in (0, 1)]
    assert {t.split("-")[0] for t in ranks[0]} == {"doc 0"}  # one file each
    assert {t.split("-")[0] for t in ranks[1]} == {"doc 1"}
    assert len(ranks[0]) == len(ranks[1]) == 20


def test_a_hub_dataset_not_cached_stops_the_launcher(hub: Path) -> None:  # noqa: F811
    with pytest.raises(RecipeError) as caught:
        validate_data(recipe(train="acme/absent"))
    assert "hf download --repo-type dataset acme/absent" in caught.value.render()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def streamed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Plan, Any]]:
    """What one rank builds for a streamed recipe, as launcher/train/entry.py builds it: a
    rank of a world of one (torchrun's variables; gloo), this process left as it was after."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState

    from launcher.tiny import build_base
    from launcher.train import callbacks
    from launcher.train import model as modeling
    from launcher.train.args import training_args
    from launcher.train.data import load_data, load_tokenizer
    from launcher.train.trainers import build_trainer

    rank = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}  # fmt: skip
    with mock.patch.dict(os.environ, rank):
        try:
            run = RunDir(tmp_path_factory.mktemp("stream"))
            plan = plan_of(recipe(shuffle_buffer=64, validation=str(TEXT)), run.path)
            build_base(plan)
            tokenizer, added = load_tokenizer(plan)
            data = load_data(plan, run, tokenizer, main=True)
            args = training_args(plan, run, has_eval=data.validation is not None)
            net, lora = modeling.build_model(plan, tokenizer, added, data)
            hooks = callbacks.RunHooks(run, "stop", keep_last=1, rank=0, model_loss=True)
            yield plan, build_trainer(plan, net, lora, args, data, tokenizer, hooks, [])
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            AcceleratorState._reset_state(reset_partial_state=True)


def test_the_rank_receives_a_stream_packed_to_max_seq_len(streamed: tuple[Plan, Any]) -> None:
    import datasets

    plan, trainer = streamed
    assert isinstance(trainer.train_dataset, datasets.IterableDataset)
    first = list(trainer.train_dataset.take(8))
    assert all(len(row["input_ids"]) == SEQ for row in first)  # wrapped: full blocks
    report = json.loads(RunDir(plan.run_dir).data_report_file.read_text())
    assert report[0]["streamed"] is True and report[0]["rows"] is None
    assert report[0]["shuffle_buffer"] == 64
    assert report[1]["role"] == "validation" and report[1]["used"] == 480  # read whole
    assert len(trainer.eval_dataset) > 0


def test_two_ranks_train_different_blocks_of_one_stream(streamed: tuple[Plan, Any]) -> None:
    _, trainer = streamed
    ranks = [rank_rows(trainer.train_dataset.take(16), rank) for rank in (0, 1)]
    blocks = [{tuple(row["input_ids"]) for row in rows} for rows in ranks]
    assert len(ranks[0]) == len(ranks[1]) == 8
    assert not blocks[0] & blocks[1]
