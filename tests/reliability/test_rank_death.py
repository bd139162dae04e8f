"""A rank dies: SIGKILL to one real `python -m launcher.train` process in the middle of a run.

Local: the launcher notices within seconds (torchrun's 1 s monitor), stops the other rank,
exits 1 naming the dead rank and quoting the end of its log, and leaves no process behind;
with train.restarts=1 it relaunches and resumes from the last complete checkpoint instead.
SLURM (2 emulated nodes): the job ends FAILED instead of hanging in a collective, `status`
says so, and no process of the run is left on either node.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from .conftest import (
    SHORT,
    SLURM_2_NODES,
    Starter,
    alive,
    assert_no_leftovers,
    complete,
    complete_steps,
    job_record,
    loss_steps,
    mentioning,
    require_slurm,
    resumed_step,
    squeue_has,
    tune,
    wait_for,
    wait_ranks,
)

pytestmark = [pytest.mark.train, pytest.mark.timeout(900)]

NOTICE_S = 60  # the launcher must notice a dead rank within this


def _kill_rank_after_first_checkpoint(run_dir: Path, rank: int) -> tuple[list[int], float]:
    """SIGKILL `rank` once checkpoint-10 is complete; returns the run's pids and the time."""
    wait_for(lambda: complete(run_dir, 10), 400, "checkpoint-10")
    ranks = wait_ranks(run_dir, 2, 60)
    pids = [p.pid for p in mentioning(run_dir)]
    ranks[rank].send_signal(signal.SIGKILL)
    return pids, time.monotonic()


def test_sigkill_of_a_rank_stops_the_run_naming_it(
    tmp_path: Path, background: Starter, record_property
) -> None:
    record_property("fault_class", "rank dies (SIGKILL), local")
    run_dir = tmp_path / "run"
    job = background(run_dir, *SHORT, "train.max_steps=100")
    pids, killed_at = _kill_rank_after_first_checkpoint(run_dir, 1)

    code = job.wait(NOTICE_S + 30)
    took = time.monotonic() - killed_at
    assert code == 1, job.explain()
    assert took < NOTICE_S, f"the launcher took {took:.0f} s to notice"
    err = job.stderr
    assert "rank 1 failed (killed by SIGKILL" in err, job.explain()
    # the dead rank's last log lines are quoted
    assert f"last lines of {run_dir}/logs/rank1.log" in err, job.explain()
    last_line = [x for x in (run_dir / "logs" / "rank1.log").read_text().splitlines() if x.strip()]
    assert last_line[-1].strip() in err
    assert not alive(pids), f"still running: {alive(pids)}"
    assert_no_leftovers(run_dir)
    record = job_record(run_dir)
    assert record["state"] == "FAILED" and "rank 1" in record["error"]
    status = tune("status", str(run_dir))
    assert status.returncode == 1 and "FAILED" in status.stdout, status.stdout
    assert complete(run_dir, 10)  # the checkpoint before the death is intact
    assert not (run_dir / "final").exists()


def test_sigkill_with_restarts_resumes_from_the_last_complete_checkpoint(
    tmp_path: Path, background: Starter, record_property
) -> None:
    record_property("fault_class", "rank dies (SIGKILL), local, train.restarts=1")
    run_dir = tmp_path / "run"
    job = background(run_dir, *SHORT, "train.max_steps=40", "train.restarts=1")
    pids, _ = _kill_rank_after_first_checkpoint(run_dir, 1)

    assert job.wait(600) == 0, job.explain()
    err = job.stderr
    assert "rank 1 failed" in err and "restart 1 of 1" in err, job.explain()
    step = resumed_step(err)
    assert step is not None and step >= 10, job.explain()
    # the step sequence goes on from the checkpoint: nothing from step 1 again, and the
    # steps logged after the checkpoint by the dead attempt were dropped (trained again)
    steps = loss_steps(run_dir)
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == 40, steps
    assert step in steps
    record = job_record(run_dir)
    assert record["state"] == "COMPLETED" and record["extra"]["attempt"] == 2
    assert (run_dir / "final" / "COMPLETE").is_file()
    assert complete_steps(run_dir)[-1] == 40
    assert not alive(pids)
    assert_no_leftovers(run_dir)


@pytest.mark.slurm
def test_sigkill_of_a_rank_on_one_slurm_node_fails_the_job(
    tmp_path: Path, background: Starter, record_property
) -> None:
    record_property("fault_class", "rank dies (SIGKILL), SLURM 2 nodes")
    require_slurm()
    run_dir = tmp_path / "run"
    job = background(run_dir, *SHORT, "train.max_steps=200", extra=SLURM_2_NODES)
    wait_for(lambda: complete(run_dir, 10), 600, "checkpoint-10 (is the SLURM job running?)")
    ranks = wait_ranks(run_dir, 2, 60)
    victim = ranks[1]
    pids = [p.pid for p in mentioning(run_dir) if p.pid != job.pid]
    victim.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()

    code = job.wait(300)  # --wait follows the job to its end: it must not hang
    took = time.monotonic() - killed_at
    assert code == 1, job.explain()
    assert took < 180, f"the job took {took:.0f} s to end after the kill"
    record = job_record(run_dir)
    assert record["backend"] == "slurm" and record["state"] == "FAILED", record
    assert not squeue_has(record["job_id"])
    status = tune("status", str(run_dir))
    assert status.returncode == 1 and "FAILED" in status.stdout, status.stdout
    assert_no_leftovers(run_dir, within_s=60)
    assert not alive(pids), f"still running: {alive(pids)}"
    assert "rank 1" in status.stdout and "SIGKILL" in status.stdout, status.stdout
