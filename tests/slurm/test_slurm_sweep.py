"""A sweep on the real SLURM test cluster (cluster/testcluster/up.sh): every variant's chain
queued at once, at most --max-parallel at a time (afterany on an earlier chain), and a
compare job after them that writes the comparison, unattended.

Skipped, with the reason, when SLURM is not installed or its controller does not answer
(tests/slurm/conftest.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from .conftest import ROOT, tune, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]


def test_sweep_queues_every_variant_at_once_and_compares_unattended(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    argv = ["sweep", str(ROOT / "recipes/quickstart.yaml"), "--backend", "slurm"]
    argv += ["--grid", "method.r=4,16", "--grid", "method.kind=lora,full"]
    argv += ["--max-parallel", "2", "--sweep-dir", str(sweep)]
    for item in ("train.max_steps=10", "eval.enabled=false", "serve.enabled=false"):
        argv += ["--set", item]
    argv += ["--set", "merge.enabled=false", "--set", "resources.gpus_per_node=1"]
    began = time.monotonic()
    queued = tune(*argv, timeout=180)
    assert queued.returncode == 0, queued.stdout + queued.stderr
    assert time.monotonic() - began < 120  # queued, not waited for
    state = json.loads((sweep / "sweep.json").read_text())["variants"]
    assert [v["state"] for v in state] == ["queued"] * 3
    first, third = state[0]["jobs"][-1], state[2]["jobs"][0]
    # the third chain waits for the first: at most two at once
    script = (sweep / state[2]["name"] / "slurm" / f"{third}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterany:{first}" in script
    comparison = sweep / "comparison.json"
    wait_for(comparison.is_file, 600, "the compare job's comparison.json")
    doc = json.loads(comparison.read_text())
    rows = doc["variants"]
    assert list(rows) == ["r=4_kind=lora", "kind=full", "r=16_kind=lora"]
    for name, row in rows.items():
        assert row["state"] == "done", (name, row)
        assert row["wall_s"] and row["wall_s"] > 0 and row["final_loss"] is not None, name
    assert doc["best"] in rows
    status = tune("status", str(sweep))
    assert status.returncode == 0 and f"best: {doc['best']}" in status.stdout
