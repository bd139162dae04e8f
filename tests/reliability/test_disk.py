"""Disk too small, on a REAL small filesystem: a 2 MiB tmpfs mounted for the test (needs
root; skipped with the reason otherwise). The quickstart plan needs ~5 MB of checkpoints
(keep_last=2, plus the one being written), so launcher/pipeline.py check_disk:

- train.min_free_disk=refuse: exit 2 before anything is written or started, naming the free
  and needed sizes and the fixes;
- train.min_free_disk=warn: the warning, then the run really runs out of space writing its
  tiny base model: exit 1 with the OS's reason (No space left on device), no traceback,
  no process left.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import SHORT, assert_no_leftovers, explain, run_cli

pytestmark = [pytest.mark.timeout(600)]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except OSError as exc:
        pytest.skip(f"cannot run mount: {exc}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 2 MiB tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        done = subprocess.run(["umount", str(mount_point)], capture_output=True, timeout=60)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=60)


def test_too_small_disk_is_refused_before_anything_runs(small_fs: Path, record_property) -> None:
    record_property("fault_class", "disk too small (tmpfs 2 MiB), min_free_disk=refuse")
    run_dir = small_fs / "run"
    result = run_cli(run_dir, *SHORT, "train.max_steps=20", timeout=300)
    assert result.returncode == 2, explain(result)
    err = result.stderr
    assert "free disk" in err and "MB" in err and "keep_last=2" in err, err
    assert "train.min_free_disk=warn" in err and "lower train.keep_last" in err
    assert "Traceback" not in err
    assert not (run_dir / "base").exists() and not list((run_dir / "logs").glob("rank*"))
    assert_no_leftovers(run_dir, within_s=5)


def test_too_small_disk_warns_then_fails_cleanly_when_it_fills(
    small_fs: Path, record_property
) -> None:
    record_property("fault_class", "disk too small (tmpfs 2 MiB), min_free_disk=warn")
    run_dir = small_fs / "run"
    result = run_cli(run_dir, *SHORT, "train.max_steps=20", "train.min_free_disk=warn", timeout=300)
    err = result.stderr
    warned = [line for line in err.splitlines() if "free disk" in line]
    assert warned and "short of" in warned[0], err
    assert result.returncode == 1, explain(result)
    assert "No space left on device" in err and "free disk space" in err, err
    assert "Traceback" not in err, err
    assert_no_leftovers(run_dir, within_s=5)
