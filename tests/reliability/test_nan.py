"""The loss goes NaN (TUNE_LAUNCH_FAULT=nan_loss:<step>, launcher/train/faults.py: the loss
of that step is multiplied by NaN on every rank, after the real forward pass).

train.nan_policy=stop: the run exits 1 naming the step, the last good checkpoint and a hint,
and that checkpoint is byte-for-byte what it was before the NaN. (tests/train covers the
message; this adds the hashes and the process table.) train.nan_policy=skip: see
test_adversarial_run.py, whose shared run skips a NaN step and completes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from .conftest import (
    SHORT,
    Starter,
    assert_no_leftovers,
    cli_env,
    complete,
    complete_steps,
    wait_for,
)

pytestmark = [pytest.mark.train, pytest.mark.timeout(900)]


def hashes(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def test_nan_stop_exits_with_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, background: Starter, record_property
) -> None:
    record_property("fault_class", "loss NaN, nan_policy=stop")
    run_dir = tmp_path / "run"
    job = background(
        run_dir, *SHORT, "train.max_steps=30", env=cli_env(TUNE_LAUNCH_FAULT="nan_loss:16")
    )
    wait_for(lambda: complete(run_dir, 10), 400, "checkpoint-10")
    good = run_dir / "checkpoints" / "checkpoint-10"
    before = hashes(good)  # taken as soon as it is complete, ~6 steps before the NaN

    assert job.wait(300) == 1, job.explain()
    err = job.stderr
    assert "non-finite loss (nan) at step 16" in err, job.explain()
    assert f"the last good checkpoint is {good}" in err
    assert "Hint:" in err and "train.learning_rate" in err and "nan_policy=skip" in err
    assert hashes(good) == before, "the last good checkpoint changed"
    assert complete_steps(run_dir) == [10]
    assert not (run_dir / "final").exists()
    assert_no_leftovers(run_dir)


def test_the_loss_watchdog_stops_a_run_whose_loss_stays_high(
    tmp_path: Path, background: Starter, record_property
) -> None:
    """axolotl's loss_watchdog_threshold / patience: the tiny model's loss starts near 7.5
    and stays above 7 for its first logged steps, so a threshold of 7 with patience 2 fails
    the run at the second logged step, before any checkpoint, and nothing is merged."""
    record_property("fault_class", "loss above the watchdog's threshold")
    run_dir = tmp_path / "run"
    job = background(
        run_dir,
        *SHORT,
        "train.max_steps=30",
        "train.logging_steps=1",
        "train.learning_rate=1e-6",  # so the loss stays where it starts
        "train.loss_watchdog_threshold=7",
        "train.loss_watchdog_patience=2",
    )
    assert job.wait(300) == 1, job.explain()
    err = job.stderr
    assert "above train.loss_watchdog_threshold=7.0 for 2 logged steps in a row, at step 2" in (
        err
    ), job.explain()
    assert "nothing merged" in err and "no checkpoint yet" in err
    assert not (run_dir / "final").exists() and not (run_dir / "merged").exists()
    assert_no_leftovers(run_dir)
