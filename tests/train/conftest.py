"""Helpers for the training tests: the real CLI in a subprocess, tiny data sets, metrics."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from launcher.rundir import RunDir

REPO = Path(__file__).resolve().parents[2]
VENV_PY = REPO / ".venv" / "bin" / "python"
PYTHON = str(VENV_PY if VENV_PY.exists() else Path(sys.executable))
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
# short runs of the quickstart: 20 steps of 16 examples, a checkpoint every 10
SHORT = ["train.max_steps=20", "train.save_steps=10", "train.logging_steps=5"]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"),
    )
    env.pop("TUNE_LAUNCH_FAULT", None)
    env.update(extra)
    return env


def run_cli(
    run_dir: Path,
    *sets: str,
    recipe: Path = QUICKSTART,
    env: dict[str, str] | None = None,
    timeout: float = 420,
) -> subprocess.CompletedProcess[str]:
    """`tune-launch run RECIPE --stages train --run-dir RUN_DIR --set ...`, as a user runs it."""
    argv = [PYTHON, "-m", "launcher.cli", "run", str(recipe), "--stages", "train"]
    argv += ["--run-dir", str(run_dir)]
    for assignment in sets:
        argv += ["--set", assignment]
    return subprocess.run(
        argv,
        cwd=REPO,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-6000:]}"


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return RunDir(run_dir).metrics()


def train_losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in metrics(run_dir) if m.get("loss") is not None]


def tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def preference_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    things = ["movie", "film", "book", "food", "service", "game", "trip", "song"]
    rows = []
    for _ in range(64):
        thing = rng.choice(things)
        rows.append(
            {
                "prompt": f"what do you think of the {thing}?",
                "chosen": f"the {thing} was lovely",
                "rejected": f"the {thing} was awful",
            }
        )
    return write_jsonl(tmp_path_factory.mktemp("pref") / "preference.jsonl", rows)


@pytest.fixture(scope="session")
def classification_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    good, bad = ["great", "lovely", "good", "wonderful", "fun"], ["awful", "boring", "bad", "dull"]
    things = ["movie", "film", "book", "food", "service"]
    rows = []
    for i in range(160):
        positive = i % 2 == 1
        word = rng.choice(good if positive else bad)
        rows.append(
            {
                "text": f"the {rng.choice(things)} was {word}",
                "label": "positive" if positive else "negative",
            }
        )
    return write_jsonl(tmp_path_factory.mktemp("cls") / "reviews.jsonl", rows)


def rank_trainer(recipe_file: Path, *overrides: str, model_loss: bool = False) -> tuple[Any, Any]:
    """(tokenizer, trainer) as a rank builds them for recipe_file, in this process, without
    training (use a GPU plan: a CPU plan's gloo arguments need a process group); no trackers."""
    from unittest import mock

    from accelerate.state import AcceleratorState

    from launcher.config.plan import ClusterFacts, resolve
    from launcher.config.recipe import load_recipe
    from launcher.tiny import build_base
    from launcher.train import callbacks
    from launcher.train import model as modeling
    from launcher.train.args import training_args
    from launcher.train.data import load_data, load_tokenizer
    from launcher.train.trainers import build_trainer

    recipe = load_recipe(recipe_file, list(overrides))
    run_dir = recipe_file.parent / "run"
    plan = resolve(recipe, ClusterFacts(run_dir=str(run_dir), python=sys.executable))
    run = RunDir(plan.run_dir)
    build_base(plan)
    with mock.patch.dict(os.environ):
        try:
            tokenizer, added = load_tokenizer(plan)
            data = load_data(plan, run, tokenizer, main=True)
            args = training_args(plan, run, has_eval=False)
            args.report_to = []
            net, lora = modeling.build_model(plan, tokenizer, added, data)
            hooks = callbacks.RunHooks(
                run=run, nan_policy="stop", keep_last=1, rank=0, model_loss=model_loss
            )
            trainer = build_trainer(plan, net, lora, args, data, tokenizer, hooks, [])
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
    return tokenizer, trainer
