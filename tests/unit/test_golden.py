"""Golden files of the rendered configs for two recipes (UPDATE_GOLDEN=1 rewrites them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.cli import main
from tests.support.golden import check_golden, skip_if_updated

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
CASES = {
    "quickstart": ["--set", "resources.cpus_per_node=2"],
    # two nodes are a SLURM job: prepared as one even on a host without sbatch
    "llama70b_qlora": ["--nodes", "2", "--backend", "slurm"],
}


def _normalise(text: str, run_dir: Path) -> str:
    import sys

    return (
        text.replace(str(run_dir), "RUN_DIR")
        .replace(sys.executable, "PYTHON")
        .replace(str(ROOT), "ROOT")
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_configs_match_golden(name: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert (
        main(
            [
                "run",
                str(ROOT / f"recipes/{name}.yaml"),
                "--dry-run",
                "--run-dir",
                str(run_dir),
                *CASES[name],
            ]
        )
        == 0
    )
    plan = json.loads((run_dir / "plan.json").read_text())
    rendered = {
        "deepspeed.json": (run_dir / "deepspeed.json").read_text(),
        "accelerate.yaml": (run_dir / "accelerate.yaml").read_text(),
        "launch.json": json.dumps({"argv": plan["launch"], "env": plan["env"]}, indent=2),
    }
    for suffix, text in rendered.items():
        check_golden(GOLDEN / f"{name}.{suffix}", _normalise(text, run_dir))
    skip_if_updated()
