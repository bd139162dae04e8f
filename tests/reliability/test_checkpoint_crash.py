"""A crash while a checkpoint is being written (TUNE_LAUNCH_FAULT=crash_in_save,
launcher/train/faults.py: rank 0 exits in the middle of the Trainer's save, after the weights
and before the optimizer state).

tests/train/test_train_runs.py::test_crash_during_a_save_leaves_the_previous_checkpoint_resumable
covers the manual path (the run fails, the partial save stays in checkpoints/.staging, the
same command resumes from the previous checkpoint and ends with the uninterrupted run's
adapter). This extends it to the automatic path: with train.restarts=1 the launcher itself
relaunches, the partial save is removed before anything reads it, and the run resumes from
the previous complete checkpoint and finishes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import (
    SHORT,
    assert_no_leftovers,
    cli_env,
    complete_steps,
    explain,
    job_record,
    loss_steps,
    resumed_step,
    run_cli,
)

pytestmark = [pytest.mark.train, pytest.mark.timeout(900)]


def test_crash_in_save_with_restarts_resumes_from_the_previous_checkpoint(
    tmp_path: Path, record_property
) -> None:
    record_property("fault_class", "crash while writing a checkpoint (restarts=1)")
    run_dir = tmp_path / "run"
    result = run_cli(
        run_dir,
        *SHORT,
        "train.max_steps=30",
        "train.restarts=1",
        env=cli_env(TUNE_LAUNCH_FAULT="crash_in_save:20"),
        timeout=600,
    )
    assert result.returncode == 0, explain(result)
    err = result.stderr
    assert "fault injection: crash while saving the checkpoint of step 20" in err
    assert "rank 0 failed" in err and "restart 1 of 1" in err, explain(result)
    # the partial save was found and removed before the resume, which used checkpoint-10
    assert "removed incomplete checkpoint" in err and ".staging" in err, explain(result)
    assert resumed_step(err) == 10, explain(result)
    ckpts = run_dir / "checkpoints"
    assert not (ckpts / ".staging").exists()
    assert complete_steps(run_dir)[-2:] == [20, 30]
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".deleting-")]
    steps = loss_steps(run_dir)
    assert steps == sorted(set(steps)) and steps[-1] == 30, steps
    assert (run_dir / "final" / "COMPLETE").is_file()
    assert job_record(run_dir)["extra"]["attempt"] == 2
    assert_no_leftovers(run_dir)
