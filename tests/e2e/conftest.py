"""One run of the README's main job (`make quickstart`), shared by every test that needs a
finished run: the end-to-end assertions, lm-eval, the parity gate and the exports."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from launcher.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    """`make quickstart` into a temporary run directory; fails with the output's tail."""
    run_dir = tmp_path_factory.mktemp("e2e") / "quickstart"
    proc = subprocess.run(
        ["make", "-s", "quickstart", f"RUN_DIR={run_dir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return RunDir(run_dir)
