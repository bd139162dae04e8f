"""Test-only fault injection: the one hook the rank's code calls at named points.

Production code calls `point(name, step, run, rank, value)` at three places and goes on with
what it returns; without TUNE_LAUNCH_FAULT in the environment that is `value`, at once.
Tests (tests/reliability, tests/train) set TUNE_LAUNCH_FAULT=<kind>:<step>[,<kind>:<step>]:

    crash_in_save    point "saving" (launcher/train/callbacks.py): rank 0 exits 1 in the middle
                     of the Trainer's checkpoint write, after the weights, before the optimizer
    exit_after_save  point "saved" (launcher/train/checkpoint.py): rank 0 exits 1 right after
                     that step's checkpoint is complete
    nan_loss         point "loss" (launcher/train/callbacks.py): the loss of that step is NaN
                     on every rank, after the real forward pass

A fault fires once per run directory and rank (RunDir.fault_flag records it), so the restarted
or resumed run goes past it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from launcher.rundir import RunDir

log = logging.getLogger(__name__)
ENV = "TUNE_LAUNCH_FAULT"


@dataclass(frozen=True)
class Fault:
    point: str  # where it fires
    message: str  # logged when it fires; {step} is the step
    exits: bool  # rank 0 exits 1; otherwise the value becomes NaN on every rank


FAULTS = {
    "crash_in_save": Fault("saving", "crash while saving the checkpoint of step {step}", True),
    "exit_after_save": Fault("saved", "exit after the checkpoint of step {step}", True),
    "nan_loss": Fault("loss", "NaN loss at step {step}", False),
}


def point(name: str, step: int, run: RunDir, rank: int, value: Any = None) -> Any:
    """The hook: `value`, unless TUNE_LAUNCH_FAULT asks for a fault at this point and step."""
    spec = os.environ.get(ENV)
    if not spec:
        return value
    asked = {item.strip() for item in spec.split(",")}
    for kind, fault in FAULTS.items():
        if fault.point != name or f"{kind}:{step}" not in asked or (fault.exits and rank != 0):
            continue
        flag = run.fault_flag(kind, step, rank)
        if flag.exists():
            continue
        flag.parent.mkdir(parents=True, exist_ok=True)
        flag.write_text(str(os.getpid()))
        message = fault.message.format(step=step)
        if fault.exits:
            log.error("fault injection: %s", message)
            logging.shutdown()
            os._exit(1)
        log.warning("fault injection: %s", message)
        value = value * float("nan")
    return value
