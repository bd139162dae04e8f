"""What the tests on the real SLURM test cluster (cluster/testcluster/up.sh) share: the check
that it answers (a test module asks for it with `pytest.mark.usefixtures("slurm_cluster")`),
and the real CLI in a subprocess with a secret in its environment that must reach no file."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECRET = "hf_test_secret_value_0123456789"
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TORCH_EXTENSIONS_DIR": os.environ.get(
        "TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")
    ),
    "HF_TOKEN": SECRET,  # a secret in the submitting shell: must reach no file
}


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    """Skip, with the reason, unless SLURM is installed, its controller answers and two
    nodes are usable."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        pytest.skip("SLURM not installed (no sinfo/sbatch); run cluster/testcluster/up.sh")
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
    if "is UP" not in ping.stdout:
        pytest.skip("slurmctld does not answer `scontrol ping`; run cluster/testcluster/up.sh")
    nodes = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=15
    ).stdout.split("\n")
    usable = [line for line in nodes if re.search(r"\s(idle|mix|alloc|comp)", line)]
    if len(usable) < 2:
        pytest.skip(f"the test cluster needs 2 usable nodes, sinfo says: {nodes}")


def tune(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`tune-launch ARGS` as a user runs it, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        cwd=ROOT,
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_for(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    """predicate()'s first truthy value, polled every 0.5 s; AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
