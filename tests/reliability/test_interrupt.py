"""The launcher is interrupted (local backend), and a second run tries the same run directory.

One run directory, three real `tune-launch` processes (the sequence costs three launches, so
the three tests below share it):
1. run 1 trains; while it runs a second `tune-launch` in the same directory must refuse
   (the run-directory lock) and start nothing; then SIGINT (Ctrl-C) to run 1;
2. run 2, the same command, resumes; SIGTERM to it after its first new checkpoint;
3. run 3, the same command, resumes again and finishes.
After each signal every process of the run must be gone and the directory resumable.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    SHORT,
    Background,
    alive,
    cli_argv,
    cli_env,
    complete,
    complete_steps,
    job_record,
    loss_steps,
    mentioning,
    rank_processes,
    resumed_step,
    run_cli,
    wait_for,
    wait_ranks,
)

pytestmark = [pytest.mark.train, pytest.mark.timeout(900)]

MAX_STEPS = 60
SETS = (*SHORT, f"train.max_steps={MAX_STEPS}")


def _stop(job: Background, run_dir: Path, sig: signal.Signals) -> dict[str, Any]:
    pids = [p.pid for p in mentioning(run_dir) if p.pid != job.pid]
    ranks = rank_processes(run_dir)
    os.kill(job.pid, sig)
    sent = time.monotonic()
    code = job.wait(120)
    return {
        "code": code,
        "took": time.monotonic() - sent,
        "pids": pids,
        "ranks": len(ranks),
        "left": alive(pids),
        "stderr": job.stderr,
        "explain": job.explain(),
        "record": job_record(run_dir),
        "complete": complete_steps(run_dir),
    }


@pytest.fixture(scope="module")
def sequence(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("interrupt")
    run_dir = root / "run"
    seen: dict[str, Any] = {"run_dir": run_dir}
    jobs: list[Background] = []
    try:
        # 1. run 1, a refused second run, SIGINT
        run1 = Background(cli_argv(run_dir, *SETS), cli_env(), root / "run1")
        jobs.append(run1)
        wait_for(lambda: complete(run_dir, 10), 400, "checkpoint-10 of run 1")
        wait_ranks(run_dir, 2, 60)
        before = {p.pid for p in mentioning(run_dir)}
        second = run_cli(run_dir, *SETS, timeout=180)
        seen["second"] = {
            "code": second.returncode,
            "stderr": second.stderr,
            "new_processes": [p.pid for p in mentioning(run_dir) if p.pid not in before],
            "first_alive": run1.proc.poll() is None,
        }
        seen["sigint"] = _stop(run1, run_dir, signal.SIGINT)
        seen["sigint"]["leftovers"] = [p.pid for p in mentioning(run_dir)]

        # 2. run 2 resumes; SIGTERM after its first new checkpoint
        run2 = Background(cli_argv(run_dir, *SETS), cli_env(), root / "run2")
        jobs.append(run2)
        start = max(seen["sigint"]["complete"])
        wait_for(lambda: complete(run_dir, start + 10), 400, f"checkpoint-{start + 10} of run 2")
        wait_ranks(run_dir, 2, 60)
        seen["sigterm"] = _stop(run2, run_dir, signal.SIGTERM)
        seen["sigterm"]["leftovers"] = [p.pid for p in mentioning(run_dir)]

        # 3. run 3 resumes and finishes
        run3 = run_cli(run_dir, *SETS, timeout=600)
        seen["run3"] = {"code": run3.returncode, "stderr": run3.stderr}
        seen["steps"] = loss_steps(run_dir)
        yield seen
    finally:
        for job in jobs:
            job.kill()
        for proc in mentioning(run_dir):
            proc.kill()


def test_a_second_run_in_the_same_directory_refuses_while_the_first_runs(
    sequence: dict[str, Any], record_property
) -> None:
    record_property("fault_class", "two runs in one run directory (lock)")
    second = sequence["second"]
    assert second["code"] != 0, second["stderr"]
    assert "is in use by tune-launch run: pid " in second["stderr"], second["stderr"]  # the holder
    assert "tune-launch cancel" in second["stderr"]  # and what to do
    assert "Traceback" not in second["stderr"]
    assert second["first_alive"], "the refused run must not disturb the first"
    assert not second["new_processes"], "the refused run started processes"


def test_sigint_stops_every_process_and_the_same_command_resumes(
    sequence: dict[str, Any], record_property
) -> None:
    record_property("fault_class", "launcher interrupted (SIGINT), local")
    stop = sequence["sigint"]
    assert stop["code"] == 130, stop["explain"]
    assert stop["took"] < 60
    assert stop["ranks"] == 2 and not stop["left"] and not stop["leftovers"], stop
    assert stop["record"]["state"] == "CANCELLED"
    assert "resume it by running the same command again" in stop["stderr"]
    # interrupted mid-run: at least checkpoint-10 complete, not the last step (how far the run
    # got between checkpoint-10 and the signal depends on the machine's load)
    assert stop["complete"] and 10 <= stop["complete"][-1] <= MAX_STEPS - 20, stop["complete"]
    run2 = sequence["sigterm"]["stderr"]
    assert "resum" in run2
    assert resumed_step(run2) == max(stop["complete"]), run2[-3000:]


def test_sigterm_stops_every_process_and_the_same_command_resumes(
    sequence: dict[str, Any], record_property
) -> None:
    record_property("fault_class", "launcher interrupted (SIGTERM), local")
    stop = sequence["sigterm"]
    assert stop["code"] != 0, stop["explain"]
    assert stop["took"] < 60
    assert stop["ranks"] == 2 and not stop["left"] and not stop["leftovers"], stop
    assert stop["record"]["state"] == "CANCELLED"
    run3 = sequence["run3"]
    assert run3["code"] == 0, run3["stderr"][-4000:]
    assert "resum" in run3["stderr"]
    resumed = resumed_step(run3["stderr"])
    assert resumed == max(stop["complete"]) and resumed > max(sequence["sigint"]["complete"])
    run_dir: Path = sequence["run_dir"]
    assert (run_dir / "final" / "COMPLETE").is_file()
    assert job_record(run_dir)["state"] == "COMPLETED"


def test_the_step_sequence_continues_across_both_interruptions(
    sequence: dict[str, Any], record_property
) -> None:
    record_property("fault_class", "launcher interrupted: step continuity over resumes")
    steps = sequence["steps"]
    # metrics.jsonl reads as one run: the steps an interrupted run logged after its last
    # complete checkpoint were dropped when the next run resumed (and trained them again)
    assert steps == sorted(set(steps)), steps
    assert steps[0] == 1 and steps[-1] == MAX_STEPS, steps
    assert set(range(5, MAX_STEPS + 1, 5)) <= set(steps), steps
