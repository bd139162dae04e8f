"""One real local training run with everything a hostile or careless recipe can plant, shared
by three checks (a launch costs ~30 s, so one run carries them):

- injection: the run directory's path, the data file's name and an env value hold spaces,
  single and double quotes, `$(touch MARKER)`, backticks, `;` and `&`; the run must work and
  no MARKER may appear anywhere (the CLI runs from a scratch working directory, so a relative
  `touch` would land there);
- secrets: HF_TOKEN, WANDB_API_KEY and a variable the recipe lists under `secrets:` hold
  known values in the launching shell; they must reach every rank's environment
  (/proc/<pid>/environ, read while the ranks run) and appear in no file of the run
  directory (bytes, binary files included) nor in the CLI's output;
- NaN skip: TUNE_LAUNCH_FAULT=nan_loss:5 with train.nan_policy=skip; the run completes.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import (
    QUICKSTART,
    REPO,
    TRAIN_DATA,
    Background,
    cli_argv,
    cli_env,
    cmdline,
    loss_steps,
    mentioning,
    metrics,
    wait_ranks,
)

pytestmark = [pytest.mark.train, pytest.mark.timeout(900)]

MARK = "TL_PWNED"
HOSTILE = f"'sq' \"dq\" $(touch {MARK}1) `touch {MARK}2`; touch {MARK}3 & x"
PLANTED_ENV = f"$(touch {MARK}4) `touch {MARK}5`; touch {MARK}6 'q' \"dq\""
SECRETS = {
    "HF_TOKEN": "hf_reliability_" + secrets.token_hex(12),
    "WANDB_API_KEY": "wandb_reliability_" + secrets.token_hex(12),
    "TL_RECIPE_SECRET": "recipe_secret_" + secrets.token_hex(12),
}


def markers(*roots: Path) -> list[Path]:
    found: list[Path] = []
    for root in roots:
        if root.is_dir():
            found += [p for p in root.rglob(f"{MARK}*")]
    return found + [p for p in Path("/").glob(f"{MARK}*")]


def files_holding(root: Path, needles: list[str]) -> dict[str, list[str]]:
    """file -> the needles found in its bytes (every file, binary ones too)."""
    hits: dict[str, list[str]] = {}
    for path in root.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        found = [n for n in needles if n.encode() in data]
        if found:
            hits[str(path)] = found
    return hits


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("hostile")
    cwd = root / "cwd"
    cwd.mkdir()
    data = root / f"data {HOSTILE}.jsonl"
    shutil.copy(TRAIN_DATA, data)
    run_dir = root / f"run {HOSTILE}"
    recipe = yaml.safe_load(QUICKSTART.read_text())
    recipe["run_dir"] = str(run_dir)
    recipe["data"] |= {"train": str(data), "val_split": 0}
    recipe["train"] |= {"max_steps": 20, "save_steps": 10, "logging_steps": 5}
    recipe["train"]["nan_policy"] = "skip"
    recipe["serve"]["enabled"] = recipe["eval"]["enabled"] = False
    recipe["eval"].pop("data")
    recipe["env"] = {"TL_PLANTED": PLANTED_ENV}
    recipe["secrets"] = ["HF_TOKEN", "WANDB_API_KEY", "TL_RECIPE_SECRET"]
    path = root / "hostile.yaml"
    path.write_text(yaml.safe_dump(recipe))

    env = cli_env(TUNE_LAUNCH_FAULT="nan_loss:5", **SECRETS)
    job = Background(cli_argv(None, recipe=path), env, root / "cli", cwd=cwd)
    seen: dict[str, Any] = {"run_dir": run_dir, "root": root, "cwd": cwd, "environ": {}}
    try:
        ranks = wait_ranks(run_dir, 2, 400)
        for rank, process in ranks.items():
            seen["environ"][rank] = process.environ()
        seen["argv"] = [" ".join(cmdline(p)) for p in mentioning(run_dir)]
        seen["code"] = job.wait(600)
    finally:
        job.kill()
        for leftover in mentioning(run_dir):
            leftover.kill()
    seen["stdout"], seen["stderr"] = job.stdout, job.stderr
    yield seen


def _explain(run: dict[str, Any]) -> str:
    return f"exit {run['code']}\n{run['stderr'][-5000:]}"


def test_hostile_paths_and_env_values_train_and_execute_nothing(
    hostile_run: dict[str, Any], record_property
) -> None:
    record_property("fault_class", "injection: run dir, data path, env value (real local training)")
    run = hostile_run
    assert run["code"] == 0, _explain(run)
    run_dir: Path = run["run_dir"]
    assert (run_dir / "final" / "COMPLETE").is_file()
    assert loss_steps(run_dir)[-1] == 20
    # the planted value reached the ranks as the literal string
    assert all(env.get("TL_PLANTED") == PLANTED_ENV for env in run["environ"].values())
    assert not markers(run["root"], run["cwd"], REPO), markers(run["root"], run["cwd"], REPO)


def test_secrets_reach_the_ranks_and_no_file(hostile_run: dict[str, Any], record_property) -> None:
    record_property("fault_class", "secrets: HF_TOKEN, WANDB_API_KEY, recipe secret (local)")
    run = hostile_run
    assert run["code"] == 0, _explain(run)
    assert sorted(run["environ"]) == [0, 1]
    for rank, env in run["environ"].items():
        for name, value in SECRETS.items():
            assert env.get(name) == value, f"{name} did not reach rank {rank}"
    values = list(SECRETS.values())
    assert not files_holding(run["run_dir"], values)
    for text in (run["stdout"], run["stderr"], *run["argv"]):
        assert not [v for v in values if v in text]
    plan = (run["run_dir"] / "plan.json").read_text()
    assert '"TL_RECIPE_SECRET"' in plan  # by name only


def test_nan_skip_completes_the_run(hostile_run: dict[str, Any], record_property) -> None:
    record_property("fault_class", "loss NaN, nan_policy=skip")
    run = hostile_run
    assert run["code"] == 0, _explain(run)
    assert "non-finite loss at step 5: micro-batch skipped" in run["stderr"], _explain(run)
    assert "micro-batches with a non-finite loss were skipped" in run["stderr"]
    losses = [m["loss"] for m in metrics(run["run_dir"]) if m.get("loss") is not None]
    assert losses and all(loss == loss and abs(loss) < 1e6 for loss in losses), losses
    assert (run["run_dir"] / "final" / "COMPLETE").is_file()
