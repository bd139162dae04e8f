"""The peers' example configs rewritten as recipes (recipes/peers/, issue 12): every one plans
and dry-runs, and docs/peer-configs.md lists each with a count of "fully" that adds up.

Plans run in-process (one import of the launcher, ~0.1 s a recipe); one recipe goes through the
CLI in a subprocess as a user would type it. Nothing trains; hub models and datasets are not
in the cache here, which plan and dry-run only warn about.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher.cli import main

ROOT = Path(__file__).resolve().parents[2]
PEERS = ROOT / "recipes" / "peers"
RECIPES = sorted(PEERS.rglob("*.yaml"))
TABLE = ROOT / "docs" / "peer-configs.md"
IDS = [str(p.relative_to(PEERS).with_suffix("")) for p in RECIPES]
PEER_NAMES = {"axolotl", "llamafactory", "torchtune", "oumi"}
EXTRA = PEERS / "extra"  # 8 more configs of the same kinds, the second table ("Beyond the 24")
# recipes the plan refuses (exit 2), with the field it names: docs/peer-configs.md says why
REFUSED_AT_PLAN = {
    "extra/torchtune/llama3_3_70b_full_multinode": "train.global_batch_size",
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def _sources(recipe: dict) -> list[str]:
    paths = []
    for key in ("train", "validation"):
        value = recipe["data"].get(key)
        if isinstance(value, str):
            paths.append(value)
        elif isinstance(value, list):
            paths.extend(source["path"] for source in value)
    return paths


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of recipes/peers/ where the local data files a recipe names (the peers' own
    demo files, e.g. LLaMA-Factory's data/identity.json, which are not shipped) exist as
    placeholders: plan and dry-run check that a local file exists, not its rows."""
    root = tmp_path_factory.mktemp("peers")
    shutil.copytree(PEERS, root, dirs_exist_ok=True)
    for recipe in root.rglob("*.yaml"):
        for path in _sources(yaml.safe_load(recipe.read_text())):
            if path.startswith(("./", "../", "data/")) or path.endswith(
                (".json", ".jsonl", ".csv", ".parquet")
            ):
                local = recipe.parent / path
                if not local.exists():
                    local.parent.mkdir(parents=True, exist_ok=True)
                    local.write_text("[]\n")
    return root


def test_every_config_of_the_brief_is_here() -> None:
    assert len([p for p in RECIPES if EXTRA not in p.parents]) == 24
    assert len([p for p in RECIPES if EXTRA in p.parents]) == 8
    assert {p.parent.name for p in RECIPES} == PEER_NAMES


@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_header_names_the_command_and_the_original(path: Path) -> None:
    lines = path.read_text().splitlines()
    assert lines[0] == f"# tune-launch {path.relative_to(ROOT)}"
    assert lines[1].startswith("# Original: "), lines[1]
    assert re.search(r"[\w-]+/[\w-]+, \S+\.(ya?ml)", lines[1]), lines[1]


@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_plan_and_dry_run_exit_0(
    path: Path, staged: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = staged / path.relative_to(PEERS)
    code = main(["plan", str(recipe), "--json"])
    out, err = capsys.readouterr()
    refused = REFUSED_AT_PLAN.get(str(path.relative_to(PEERS).with_suffix("")))
    if refused:
        assert code == 2 and refused in err and "Traceback" not in err, err
        return
    assert code == 0, err
    assert "Traceback" not in err
    plan = json.loads(out)
    assert plan["global_batch_size"] == (
        plan["micro_batch_size"] * plan["gradient_accumulation_steps"] * plan["world_size"]
    )
    code = main(["run", str(recipe), "--dry-run", "--run-dir", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in out + err
    assert "dry run: nothing was launched" in out
    assert (tmp_path / "run" / "plan.json").exists()


def test_one_plan_through_the_cli(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    recipe = PEERS / "torchtune" / "llama3_1_8b_lora.yaml"
    done = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "plan", str(recipe), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert json.loads(done.stdout)["world_size"] == 2


def _rows(table: str | None = None) -> list[list[str]]:
    rows = []
    for line in (TABLE.read_text() if table is None else table).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and any("recipes/peers/" in c for c in cells):
            rows.append(cells)
    return rows


def test_table_lists_every_recipe_once() -> None:
    named = [
        m for row in _rows() for m in re.findall(r"recipes/peers/[\w/.-]+\.yaml", " ".join(row))
    ]
    assert sorted(named) == sorted(str(p.relative_to(ROOT)) for p in RECIPES)


@pytest.mark.parametrize("extra", [False, True], ids=["the 24", "beyond the 24"])
def test_table_summary_counts_the_fully_rows(extra: bool) -> None:
    first, _, second = TABLE.read_text().partition("## Beyond the 24")
    text = second if extra else first
    rows = _rows(text)
    recipes = [p for p in RECIPES if (EXTRA in p.parents) == extra]
    fully = [r for r in rows if any(c.lower() == "fully" for c in r)]
    partly = [r for r in rows if any(c.lower() in ("partly", "refused") for c in r)]
    assert len(fully) + len(partly) == len(rows) == len(recipes)
    summary = re.search(r"(\d+) of (\d+) fully", text)
    assert summary, "docs/peer-configs.md needs a summary line 'N of M fully' in each table"
    assert int(summary.group(1)) == len(fully)
    assert int(summary.group(2)) == len(recipes)
