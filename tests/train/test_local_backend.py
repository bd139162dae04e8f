"""The local backend with a stand-in launch command (fast: no torch, no training), and one
real run: the request `--dry-run` prints is the request the run submits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.base import JobRecord
from cluster.local import LocalBackend
from launcher.config.plan import ClusterFacts, Plan, resolve
from launcher.config.recipe import load_recipe, localize
from launcher.errors import RunError
from launcher.pipeline import run_pipeline
from launcher.plan_files import write_plan
from launcher.rundir import RunDir

from .conftest import PYTHON, QUICKSTART, REPO, cli_env, explain

FAKE_LAUNCH = """
import os, pathlib, subprocess, sys, time
run = pathlib.Path(sys.argv[1])
mode = os.environ["FAKE_MODE"]
logs = run / "logs"
logs.mkdir(exist_ok=True)
print("rank 0 progress", os.environ.get("PLAN_VAR"), os.environ.get("FAKE_SECRET"), flush=True)
if mode == "fail":
    (logs / "rank1.log").write_text("starting\\nstep 3\\nValueError: boom on rank 1\\n")
    (logs / "rank1.error").write_text("ValueError: boom on rank 1")
    sys.exit(1)
if mode == "flaky":
    count = run / "attempts"
    seen = int(count.read_text()) if count.exists() else 0
    count.write_text(str(seen + 1))
    sys.exit(1 if seen == 0 else 0)
if mode in ("sleep", "stubborn"):
    # stubborn: like a torchrun worker, the rank has a session of its own, and it ignores SIGTERM
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"
    rank = subprocess.Popen(
        [sys.executable, "-c", code if mode == "stubborn" else "import time; time.sleep(300)"],
        start_new_session=mode == "stubborn",
    )
    (run / "rank.pid").write_text(str(rank.pid))
    time.sleep(300)
"""


def fake_plan(tmp_path: Path, mode: str, restarts: int = 0) -> Plan:
    script = tmp_path / "fake_launch.py"
    script.write_text(FAKE_LAUNCH)
    recipe = localize(load_recipe(QUICKSTART), QUICKSTART.parent)
    run_dir = tmp_path / "run"
    plan = resolve(recipe, ClusterFacts(run_dir=str(run_dir), python=sys.executable, cpus=2))
    recipe = plan.recipe.model_copy(
        update={"train": plan.recipe.train.model_copy(update={"restarts": restarts})}
    )
    return plan.model_copy(
        update={
            "recipe": recipe,
            "launch": [sys.executable, str(script), str(run_dir)],
            "env": {**plan.env, "FAKE_MODE": mode, "PLAN_VAR": "from-plan"},
        }
    )


def submit(plan: Plan) -> int:
    backend = LocalBackend()
    return backend.submit(backend.prepare(plan))


def test_success_merges_plan_env_and_records_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FAKE_SECRET", "s3cret")
    plan = fake_plan(tmp_path, "ok")
    assert submit(plan) == 0
    run_dir = Path(plan.run_dir)
    record = JobRecord.load(run_dir)
    assert record is not None and (record.backend, record.state) == ("local", "COMPLETED")
    assert record.pids and record.extra["pgid"] == record.pids[0]
    assert "rank 0 progress from-plan s3cret" in capfd.readouterr().err
    assert "from-plan" in (run_dir / "logs" / "launcher.log").read_text()
    assert "s3cret" not in (run_dir / "job.json").read_text()
    assert LocalBackend().status(run_dir).state == "COMPLETED"
    assert LocalBackend().wait(run_dir) == 0
    # the request it ran is recorded as the dry run prints it
    request = RunDir(run_dir).request_file.read_text()
    assert request == LocalBackend().prepare(plan).render() + "\n"
    assert f"command   {' '.join(plan.launch)}" in request and "PLAN_VAR=from-plan" in request


def test_failure_names_the_rank_and_shows_its_last_lines(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    plan = fake_plan(tmp_path, "fail")
    assert submit(plan) == 1
    err = capfd.readouterr().err
    assert "rank 1 failed (exit code 1)" in err
    assert "ValueError: boom on rank 1" in err
    record = JobRecord.load(Path(plan.run_dir))
    assert record is not None and record.state == "FAILED" and "rank 1" in (record.error or "")


def test_restarts_launch_again(tmp_path: Path) -> None:
    plan = fake_plan(tmp_path, "flaky", restarts=1)
    assert submit(plan) == 0
    record = JobRecord.load(Path(plan.run_dir))
    assert record is not None and record.extra["attempt"] == 2
    assert submit(fake_plan(tmp_path, "fail", restarts=2)) == 1


def test_a_second_run_in_the_same_directory_is_refused(tmp_path: Path) -> None:
    plan = fake_plan(tmp_path, "ok")
    Path(plan.run_dir).mkdir(parents=True, exist_ok=True)
    # the pipeline holds the run directory's lock around the backend: "another run" is
    # another process holding it
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from launcher.rundir import RunDir\n"
            "with RunDir(sys.argv[1]).lock('another run'):\n"
            "    print('held', flush=True); time.sleep(60)",
            plan.run_dir,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RunError, match="in use by another run"):
            run_pipeline(plan, stages=["train"], wait=True)
    finally:
        holder.kill()
        holder.wait()
    with RunDir(plan.run_dir).lock("this test"):  # the lock went with its holder
        assert submit(plan) == 0


def _start_in_background(plan: Plan) -> subprocess.Popen[bytes]:
    write_plan(plan)
    code = (
        "import sys; from cluster.local import LocalBackend; from launcher.rundir import RunDir;"
        "b = LocalBackend(grace_s=3); sys.exit(b.submit(b.prepare(RunDir(sys.argv[1]).load_plan())))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, plan.run_dir], cwd=REPO)
    pid_file = Path(plan.run_dir) / "rank.pid"
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pid_file.exists(), "the stand-in launch never started"
    return proc


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie (already dead, not yet reaped) counts as gone
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split()[2] == "Z"


def test_cancel_signals_the_recorded_process_group(tmp_path: Path) -> None:
    plan = fake_plan(tmp_path, "sleep")
    proc = _start_in_background(plan)
    run_dir = Path(plan.run_dir)
    rank = int((run_dir / "rank.pid").read_text())
    assert LocalBackend().status(run_dir).state == "RUNNING"
    LocalBackend(grace_s=3).cancel(run_dir)
    assert proc.wait(timeout=30) != 0
    assert _gone(rank)
    assert json.loads((run_dir / "job.json").read_text())["state"] == "CANCELLED"


def test_cancel_kills_a_rank_in_its_own_session_that_ignores_sigterm(tmp_path: Path) -> None:
    plan = fake_plan(tmp_path, "stubborn")
    proc = _start_in_background(plan)
    rank = int((Path(plan.run_dir) / "rank.pid").read_text())
    started = time.monotonic()
    LocalBackend(grace_s=2).cancel(Path(plan.run_dir))
    while not _gone(rank) and time.monotonic() - started < 20:
        time.sleep(0.1)  # SIGKILL sent after the 2 s grace: dying takes a moment
    assert _gone(rank)
    assert proc.wait(timeout=30) != 0


def test_sigterm_to_the_launcher_stops_every_process(tmp_path: Path) -> None:
    plan = fake_plan(tmp_path, "sleep")
    proc = _start_in_background(plan)
    rank = int((Path(plan.run_dir) / "rank.pid").read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 1
    assert _gone(rank)
    assert LocalBackend().status(Path(plan.run_dir)).state == "CANCELLED"


def test_logs_read_a_rank_log(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "rank1.log").write_text("a\nb\n")
    JobRecord(backend="local", job_id="x", state="COMPLETED").save(tmp_path)
    assert list(LocalBackend().logs(tmp_path, 1, follow=True)) == ["a", "b"]
    assert list(LocalBackend().logs(tmp_path, 3, follow=False)) == []


@pytest.mark.train
def test_the_dry_run_prints_the_request_the_run_submits(tmp_path: Path) -> None:
    """`tune-launch RECIPE --dry-run`, then `tune-launch RECIPE`: one backend (local, one
    node), one request; the run records the request it ran in RUN_DIR/request.txt."""
    run_dir = tmp_path / "run"
    argv = [PYTHON, "-m", "launcher.cli", str(QUICKSTART), "--stages", "train"]
    argv += ["--run-dir", str(run_dir)]
    for assignment in (
        "train.max_steps=2",
        "train.save_steps=2",
        "data.val_split=0",
        "serve.enabled=false",
        "eval.enabled=false",
    ):
        argv += ["--set", assignment]

    def tune(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*argv, *extra], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=420
        )

    dry = tune("--dry-run")
    assert dry.returncode == 0, explain(dry)
    assert dry.stdout.startswith("--- local launch"), dry.stdout[:300]
    real = tune()
    assert real.returncode == 0, explain(real)
    submitted = RunDir(run_dir).request_file.read_text()
    assert dry.stdout.startswith(submitted + "\nplan "), (submitted, dry.stdout[:2000])
    record = JobRecord.load(run_dir)
    assert record is not None and (record.backend, record.state) == ("local", "COMPLETED")
