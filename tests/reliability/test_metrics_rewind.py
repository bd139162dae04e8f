"""metrics.jsonl after a resume reads as one run (launcher/train/callbacks.py
MetricsCallback.rewind): the records an interrupted run logged after its last complete
checkpoint, and a line torn by the kill, are dropped when the next run starts from that
checkpoint (the steps are trained again and logged once more). The real-process version is
test_interrupt.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_rewind_drops_records_after_the_resumed_step_and_torn_lines(
    tmp_path: Path, record_property: pytest.RecordProperty
) -> None:
    record_property("fault_class", "launcher interrupted: step continuity over resumes")
    from launcher.rundir import RunDir
    from launcher.train.callbacks import MetricsCallback

    run = RunDir(tmp_path)
    path = run.metrics_file
    records = [{"step": s, "loss": 1.0 / s} for s in (1, 5, 10, 15)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 20, "lo')
    callback = MetricsCallback(run)
    callback.rewind(10)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 5, 10]
    callback.rewind(10)  # idempotent
    assert len(path.read_text().splitlines()) == 3
    callback.rewind(0)  # a run that starts from scratch
    assert path.read_text() == ""
    MetricsCallback(RunDir(tmp_path / "absent")).rewind(5)  # no file: nothing to do
