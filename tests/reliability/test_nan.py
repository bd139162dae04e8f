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
