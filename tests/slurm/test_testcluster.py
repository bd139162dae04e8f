"""Checks that the real SLURM test cluster (cluster/testcluster/up.sh) works.

Assumes the cluster is already up; skips when SLURM is absent or its controller does not answer.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import pytest

pytestmark = pytest.mark.slurm

NODES = ("n1", "n2")


def _run(*cmd: str, timeout: float = 30) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return proc.stdout


def _controller_answers() -> bool:
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "is UP" in out.stdout


@pytest.fixture(scope="module", autouse=True)
def _cluster_up() -> None:
    if shutil.which("sinfo") is None:
        pytest.skip("SLURM not installed (sinfo not on PATH); run cluster/testcluster/up.sh")
    if not _controller_answers():
        pytest.skip("slurmctld does not answer `scontrol ping`; run cluster/testcluster/up.sh")


def _wait(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def _job_field(job_id: str, field: str) -> str:
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=10
    ).stdout
    m = re.search(rf"\b{field}=(\S*)", out)
    return m.group(1) if m else ""


def _sbatch(*args: str) -> str:
    out = _run("sbatch", "--parsable", "-o", "/dev/null", "-e", "/dev/null", *args)
    return out.strip().split(";")[0]


def test_nodes_have_addresses_not_resolvable_names() -> None:
    out = _run("sinfo", "-h", "-N", "-p", "debug", "-o", "%N %t")
    states = dict(line.split() for line in out.splitlines())
    assert set(states) == set(NODES), out
    for node in NODES:
        show = _run("scontrol", "-o", "show", "node", node)
        # launchers must take MASTER_ADDR from NodeAddr: the names n1/n2 need not resolve
        assert "NodeAddr=127.0.0.1" in show, show


def test_srun_two_nodes() -> None:
    out = _run(
        "srun",
        "-N2",
        "--ntasks-per-node=1",
        "-t",
        "1",
        "bash",
        "-c",
        "echo $SLURM_NODEID $SLURM_NNODES",
        timeout=45,
    )
    assert sorted(out.split("\n")[:-1]) == ["0 2", "1 2"], out


def test_cancelled_job_is_in_accounting() -> None:
    job = _sbatch("--wrap", "sleep 60")
    try:
        _wait(lambda: _job_field(job, "JobState") == "RUNNING", 20, f"job {job} to run")
    finally:
        _run("scancel", job)

    def state() -> str:
        return _run("sacct", "-j", job, "-X", "-n", "-P", "-o", "State").strip()

    final = _wait(
        lambda: state().startswith("CANCELLED") and state(), 20, f"sacct CANCELLED for {job}"
    )
    assert final.startswith("CANCELLED"), final


def test_requeue() -> None:
    job = _sbatch("--requeue", "--wrap", "sleep 60")
    try:
        _wait(lambda: _job_field(job, "JobState") == "RUNNING", 20, f"job {job} to run")
        _run("scontrol", "requeue", job)
        _wait(lambda: _job_field(job, "Restarts") == "1", 10, f"job {job} requeued")
        # cred_expire=10 in slurm.conf: the requeued job may start again after ~10 s, not 120 s
        _wait(
            lambda: _job_field(job, "JobState") == "RUNNING" and _job_field(job, "Restarts") == "1",
            45,
            f"requeued job {job} to run again",
        )
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=10)
