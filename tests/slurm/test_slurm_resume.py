"""Resume on the real SLURM test cluster (cluster/testcluster/up.sh) with fewer nodes: a
2-node ZeRO-2 run, resubmitted with --nodes 1, continues from its checkpoint, on one process
with the ZeRO state resharded (launcher/train/resume.py), and trains every row once.

Skipped, with the reason, when SLURM is not installed or its controller does not answer
(tests/slurm/conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.rundir import RunDir
from launcher.train.samples import steps_to_rows

from .conftest import ROOT, tune

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

SETS = [
    "train.save_steps=3",
    "train.logging_steps=1",
    "train.log_samples=true",
    "eval.enabled=false",
]


def submit(run: Path, nodes: int, steps: int) -> str:
    argv = [str(ROOT / "recipes/quickstart.yaml"), "--backend", "slurm", "--stages", "train"]
    argv += ["--nodes", str(nodes), "--gpus-per-node", "1", "--wait", "--run-dir", str(run)]
    for assignment in [*SETS, f"train.max_steps={steps}"]:
        argv += ["--set", assignment]
    done = tune(*argv, timeout=420)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_two_node_run_resubmitted_on_one_node_continues_from_its_step(tmp_path: Path) -> None:
    run = tmp_path / "run"
    submit(run, nodes=2, steps=6)
    first_job = json.loads(RunDir(run).job_file.read_text())["job_id"]
    assert train_steps(run) == list(range(1, 7))

    out = submit(run, nodes=1, steps=9)
    assert json.loads(RunDir(run).job_file.read_text())["job_id"] != first_job
    assert "resuming from checkpoint-6 (step 6)" in out
    assert "processes 2 -> 1 (ZeRO state resharded at start)" in out
    assert "resources.nodes 2 -> 1" in out
    log = RunDir(run).rank_log(0).read_text()
    assert "converted checkpoint-6 to a universal checkpoint" in log
    assert train_steps(run) == list(range(1, 10)), "every step once, none redone"
    # 9 steps x 16 rows: each row of the epoch at most once, across the change of nodes
    by_step = steps_to_rows(RunDir(run))
    assert sorted(by_step) == list(range(1, 10))
    rows = [row for step_rows in by_step.values() for row in step_rows]
    assert len(rows) == 9 * 16 and len(set(rows)) == len(rows)
    assert RunDir(run).read_marker(RunDir(run).final) is not None


def train_steps(run: Path) -> list[int]:
    return [int(m["step"]) for m in RunDir(run).metrics() if m.get("loss") is not None]
