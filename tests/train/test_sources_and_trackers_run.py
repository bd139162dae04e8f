"""One short real run of the quickstart (tiny Llama, LoRA, one process) on two data
sources mixed 3:1 that reports to TensorBoard, W&B (offline) and MLflow (sqlite in RUN_DIR):
the data report counts each source's rows, each tracker's own reader gives back the losses
metrics.jsonl holds, and WANDB_API_KEY, exported in the submitting shell, lands in no file of
the run directory."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from launcher.rundir import RunDir

from .conftest import PYTHON, REPO, cli_env, explain, run_cli, train_losses, write_jsonl

pytestmark = pytest.mark.train

SECRET = "wandb-key-must-stay-out-of-the-run-dir-7f3a"
QUICKSTART_DATA = REPO / "recipes" / "data" / "quickstart_train.jsonl"
STEPS = ["train.max_steps=6", "train.save_steps=6", "train.logging_steps=2", "data.val_split=0"]
# one process (the trackers report from rank 0 only; the data mix is the same on every rank)
ONE_PROCESS = ["resources.gpus_per_node=1", "distributed.strategy=ddp", "train.global_batch_size=8"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("mixed")
    rows = [json.loads(line) for line in QUICKSTART_DATA.read_text().splitlines()[:40]]
    second = write_jsonl(
        folder / "reviews_qa.jsonl",
        [{"question": r["instruction"] + "\n\n" + r["input"], "answer": r["output"]} for r in rows],
    )
    sources = (
        f"data.train=[{{path: {QUICKSTART_DATA}, weight: 3}}, "
        f"{{path: {second}, weight: 1, columns: {{question: instruction, answer: output}}}}]"
    )
    run = folder / "run"
    result = run_cli(
        run,
        sources,
        "train.trackers=[tensorboard,wandb,mlflow]",
        *STEPS,
        *ONE_PROCESS,
        env=cli_env(WANDB_API_KEY=SECRET),
        timeout=300,
    )
    assert result.returncode == 0, explain(result)
    return run


def test_the_data_report_counts_each_sources_rows(run_dir: Path) -> None:
    report = json.loads(RunDir(run_dir).data_report_file.read_text())
    train = [r for r in report if r["role"] == "train"]
    assert [(r["source"], r["weight"]) for r in train] == [
        ("quickstart_train.jsonl", 3.0),
        ("reviews_qa.jsonl", 1.0),
    ]
    # 480 + 40 rows = 520 in the mix, shared 3:1
    assert [r["used"] for r in train] == [390, 130]
    log = RunDir(run_dir).rank_log(0).read_text()
    assert "reviews_qa.jsonl (train): 40 rows, 40 valid" in log
    assert "130 in the training mix, weight 1" in log


def tensorboard_losses(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses: dict[int, float] = {}
    for events in RunDir(run_dir).tensorboard.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            losses |= {e.step: e.value for e in acc.Scalars("train/loss")}
    return losses


def wandb_records(run_dir: Path, *flags: str) -> list[dict[str, Any]]:
    """The offline run's records, read by W&B's own reader (`wandb leet inspect`)."""
    (folder,) = RunDir(run_dir).wandb.glob("offline-run-*")
    wandb = str(Path(PYTHON).parent / "wandb")
    out = subprocess.run(
        [wandb, "leet", "inspect", "--json", *flags, str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [json.loads(out)] if flags else [json.loads(line) for line in out.splitlines()]


def mlflow_losses(run_dir: Path) -> tuple[dict[int, float], str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{RunDir(run_dir).mlflow_db}")
    experiment = client.get_experiment_by_name("quickstart")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "loss")
    return {m.step: m.value for m in history}, run.info.run_name


def test_every_tracker_gives_back_the_losses_of_metrics_jsonl(run_dir: Path) -> None:
    logged = {m["step"]: m["loss"] for m in RunDir(run_dir).metrics() if m.get("loss") is not None}
    assert len(logged) >= 3 and list(logged.values()) == train_losses(run_dir)

    assert tensorboard_losses(run_dir) == pytest.approx(logged)

    summary = wandb_records(run_dir, "--summary")[0]
    assert (summary["project"], summary["name"], summary["state"]) == (
        "quickstart",
        "quickstart",
        "finished",
    )
    history = [r["history"]["item"] for r in wandb_records(run_dir) if r["type"] == "history"]
    wandb_losses = {h["train/global_step"]: h["train/loss"] for h in history if "train/loss" in h}
    assert wandb_losses == pytest.approx(logged)

    losses, name = mlflow_losses(run_dir)
    assert name == "quickstart" and losses == pytest.approx(logged)


def test_the_wandb_key_lands_in_no_file_of_the_run_directory(run_dir: Path) -> None:
    secret = SECRET.encode()
    leaked = [p for p in run_dir.rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert leaked == []
