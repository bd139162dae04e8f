"""Two runs in one run directory, SLURM: a SLURM job outlives the `tune-launch` that submitted
it, so the run-directory lock alone cannot protect it. A second submission into a run
directory whose job.json names a live SLURM job (here a real `sleep` job) must refuse before
writing anything, and leave the job alone. (The local case is in test_interrupt.py.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cluster.base import JobRecord

from .conftest import SHORT, explain, require_slurm, run_cli, squeue_has, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]


def test_a_second_submission_into_a_live_slurm_run_dir_refuses(
    tmp_path: Path, record_property: pytest.RecordProperty
) -> None:
    record_property("fault_class", "two runs in one run directory (SLURM job still live)")
    require_slurm()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    job_id = subprocess.run(
        ["sbatch", "--parsable", "-N1", "-n1", "-J", "tl-reliability-lock", "-o", "/dev/null",
         "--wrap", "sleep 300"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip().split(";")[0]  # fmt: skip
    try:
        wait_for(lambda: squeue_has(job_id), 30, f"job {job_id} in the queue")
        JobRecord(backend="slurm", job_id=job_id, extra={"folder": str(run_dir / "slurm")}).save(
            run_dir
        )
        result = run_cli(
            run_dir,
            *SHORT,
            "train.max_steps=6",
            extra=("--backend", "slurm", "--nodes", "2", "--gpus-per-node", "1"),
            timeout=180,
        )
        assert result.returncode == 1, explain(result)
        assert f"in use by SLURM job {job_id}" in result.stderr, explain(result)
        assert "Traceback" not in result.stderr
        assert JobRecord.load(run_dir).job_id == job_id  # type: ignore[union-attr]
        assert not (run_dir / "plan.json").exists()
        assert squeue_has(job_id), "the live job was disturbed"
    finally:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=60)
