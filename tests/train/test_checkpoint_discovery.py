"""Checkpoint discovery, cleanup and pruning, and the test-only fault hook (fast, no training)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launcher.rundir import RunDir
from launcher.train import checkpoint, faults

REPO = Path(__file__).resolve().parents[2]


def make(run: RunDir, step: int, complete: bool = True) -> Path:
    path = run.checkpoint(step)
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text("{}")
    if complete:
        RunDir.mark_complete(path, {"step": step})
    return path


def test_last_complete_ignores_partial_ones(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.last_complete_checkpoint() is None
    make(run, 10)
    make(run, 20)
    make(run, 30, complete=False)
    (run.checkpoints / "checkpoint-x").mkdir()
    (run.staging / "checkpoint-40").mkdir(parents=True)
    last = run.last_complete_checkpoint()
    assert last is not None and last.step == 20
    assert [c.step for c in run.list_checkpoints()] == [10, 20, 30]


def test_clean_partial_removes_staging_and_unmarked(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    make(run, 10)
    make(run, 30, complete=False)
    (run.staging / "checkpoint-40").mkdir(parents=True)
    removed = checkpoint.clean_partial(run)
    assert set(removed) == {run.staging, run.checkpoint(30)}
    assert [c.step for c in run.list_checkpoints()] == [10]


def test_prune_keeps_the_newest_and_the_protected(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    paths = {step: make(run, step) for step in (10, 20, 30, 40)}
    make(run, 50, complete=False)
    removed = checkpoint.prune(run, keep_last=2, protect={paths[10]})
    assert removed == [run.checkpoint(20)]
    left = [c.step for c in run.list_checkpoints()]
    assert left == [10, 30, 40, 50]  # the partial one is not pruning's business
    assert [p.name for p in run.checkpoints.iterdir() if p.name.startswith(".")] == []


def test_publish_marks_and_replaces_a_stale_directory(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    staged = run.staging / "checkpoint-5"
    staged.mkdir(parents=True)
    (staged / "new").write_text("1")
    stale = run.checkpoint(5)
    stale.mkdir()
    (stale / "old").write_text("1")
    RunDir.publish(staged, stale, {"step": 5})
    assert (stale / "new").exists() and not (stale / "old").exists()
    assert (RunDir.read_marker(stale) or {}).get("step") == 5
    assert run.last_complete_checkpoint() is not None


def test_empty_adapter_is_refused(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({}, str(tmp_path / checkpoint.ADAPTER_FILE))
    with pytest.raises(checkpoint.CheckpointError, match="ZeRO-3"):
        checkpoint.check_adapter(tmp_path)
    save_file({"a.lora_A.weight": torch.zeros(0)}, str(tmp_path / checkpoint.ADAPTER_FILE))
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.check_adapter(tmp_path)
    save_file({"a.lora_A.weight": torch.ones(2, 2)}, str(tmp_path / checkpoint.ADAPTER_FILE))
    assert checkpoint.check_adapter(tmp_path) == 1


def test_the_nan_fault_fires_once_per_run_dir_and_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    run, loss = RunDir(tmp_path), torch.tensor(1.5)
    assert faults.point("loss", 3, run, 0, loss) is loss  # no TUNE_LAUNCH_FAULT: untouched
    monkeypatch.setenv(faults.ENV, "crash_in_save:20,nan_loss:3")
    assert faults.point("loss", 2, run, 0, loss) is loss
    assert faults.point("saving", 10, run, 0) is None  # not this step: no crash
    assert torch.isnan(faults.point("loss", 3, run, 0, loss))
    assert torch.isnan(faults.point("loss", 3, run, 1, loss))  # every rank
    assert faults.point("loss", 3, run, 0, loss) is loss  # fired once
    assert faults.point("saving", 20, run, 1) is None  # crashes are rank 0's


@pytest.mark.parametrize("kind,where", [("crash_in_save", "saving"), ("exit_after_save", "saved")])
def test_an_exit_fault_ends_rank_0_once(tmp_path: Path, kind: str, where: str) -> None:
    code = (
        "import sys; from launcher.rundir import RunDir; from launcher.train import faults; "
        f"faults.point({where!r}, 20, RunDir(sys.argv[1]), 0); print('went on')"
    )
    argv = [sys.executable, "-c", code, str(tmp_path)]
    env = {faults.ENV: f"{kind}:20"}
    first = subprocess.run(argv, cwd=REPO, env=env, text=True, capture_output=True)
    assert first.returncode == 1 and "fault injection" in first.stderr, first.stderr
    assert "went on" not in first.stdout
    again = subprocess.run(argv, cwd=REPO, env=env, text=True, capture_output=True)
    assert again.returncode == 0 and "went on" in again.stdout, again.stderr
