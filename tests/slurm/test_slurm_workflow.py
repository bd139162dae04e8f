"""The shipped three-stage workflow on the real SLURM test cluster (cluster/testcluster/up.sh):
queued at once and run unattended, each stage's chain started by a small job after the
previous chain succeeded (`afterok`), from the previous stage's result.

Skipped, with the reason, when SLURM is not installed or its controller does not answer
(tests/slurm/conftest.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from launcher.rundir import RunDir

from .conftest import ROOT, tune, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]


def test_three_stages_run_unattended_on_slurm(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    argv = [str(ROOT / "recipes/cpu/three_stage.yaml"), "--run-dir", str(run_dir)]
    for item in (
        "resources.backend=slurm",
        "train.max_steps=6",  # every stage: CI time
        "eval.enabled=false",
        "serve.enabled=false",
    ):
        argv += ["--set", item]
    began = time.monotonic()
    queued = tune(*argv, timeout=180)
    assert queued.returncode == 0, queued.stdout + queued.stderr
    assert time.monotonic() - began < 120  # queued, not waited for
    assert "queued on SLURM; the later stages follow it unattended" in queued.stderr
    cpt, sft, dpo = (RunDir(run_dir / "stages" / n) for n in ("0-cpt", "1-sft", "2-dpo"))
    wait_for(lambda: RunDir.is_complete(dpo.merged), 900, "the last stage's merged model")
    # each stage started from its predecessor's result, on the cluster
    assert sft.load_plan().base_model == str(cpt.final)
    assert dpo.load_plan().base_model == str(sft.merged)
    state = {s["name"]: s for s in json.loads((run_dir / "workflow.json").read_text())["stages"]}
    assert state["cpt"]["state"] == state["sft"]["state"] == "done"
    assert state["sft"]["starts_from"]["path"] == str(cpt.final)
    assert state["dpo"]["starts_from"]["path"] == str(sft.merged)
    for stage in (cpt, sft, dpo):
        marker = stage.read_marker(stage.final)
        assert marker is not None and marker["step"] == 6, (stage.path, marker)
    status = tune("status", str(run_dir))
    assert status.returncode == 0, status.stdout + status.stderr
    lines = status.stdout.splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["cpt", "sft", "dpo"], status.stdout
    assert "done" in lines[1] and "done" in lines[2], status.stdout
