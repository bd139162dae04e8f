"""One run of the README's main job (`make quickstart`), shared by every test that needs a
finished run: the end-to-end assertions, lm-eval, the parity gate and the exports."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from launcher.rundir import RunDir
from tests.support.shared_runs import build_once

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    """`make quickstart` into a temporary run directory, once per pytest run (every xdist
    worker reads the same one); fails with the output's tail."""

    def build(out: Path) -> None:
        proc = subprocess.run(
            ["make", "-s", "quickstart", f"RUN_DIR={out}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=1500,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    return RunDir(build_once(tmp_path_factory, "e2e-quickstart", build))
