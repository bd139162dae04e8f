"""Checkpoint discovery, cleanup and pruning (fast, no training)."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.train import checkpoint


def make(root: Path, step: int, complete: bool = True) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text("{}")
    if complete:
        checkpoint.mark_complete(path, {"step": step})
    return path


def test_last_complete_ignores_partial_ones(tmp_path: Path) -> None:
    assert checkpoint.last_complete(tmp_path / "none") is None
    make(tmp_path, 10)
    make(tmp_path, 20)
    make(tmp_path, 30, complete=False)
    (tmp_path / "checkpoint-x").mkdir()
    (tmp_path / checkpoint.STAGING / "checkpoint-40").mkdir(parents=True)
    last = checkpoint.last_complete(tmp_path)
    assert last is not None and last.step == 20
    assert [c.step for c in checkpoint.list_checkpoints(tmp_path)] == [10, 20, 30]


def test_clean_partial_removes_staging_and_unmarked(tmp_path: Path) -> None:
    make(tmp_path, 10)
    make(tmp_path, 30, complete=False)
    (tmp_path / checkpoint.STAGING / "checkpoint-40").mkdir(parents=True)
    removed = checkpoint.clean_partial(tmp_path)
    assert {p.name for p in removed} == {checkpoint.STAGING, "checkpoint-30"}
    assert [c.step for c in checkpoint.list_checkpoints(tmp_path)] == [10]


def test_prune_keeps_the_newest_and_the_protected(tmp_path: Path) -> None:
    paths = {step: make(tmp_path, step) for step in (10, 20, 30, 40)}
    make(tmp_path, 50, complete=False)
    removed = checkpoint.prune(tmp_path, keep_last=2, protect={paths[10]})
    assert {p.name for p in removed} == {"checkpoint-20"}
    left = [c.step for c in checkpoint.list_checkpoints(tmp_path)]
    assert left == [10, 30, 40, 50]  # the partial one is not pruning's business


def test_publish_replaces_a_stale_directory(tmp_path: Path) -> None:
    staged = tmp_path / checkpoint.STAGING / "checkpoint-5"
    staged.mkdir(parents=True)
    (staged / "new").write_text("1")
    stale = tmp_path / "checkpoint-5"
    stale.mkdir()
    (stale / "old").write_text("1")
    checkpoint.publish(staged, stale)
    assert (stale / "new").exists() and not (stale / "old").exists()


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


def test_a_fault_fires_once_per_run_dir_and_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNE_LAUNCH_FAULT", "crash_in_save:20,nan_loss:3")
    assert not checkpoint.fault("crash_in_save", 10, tmp_path)
    assert checkpoint.fault("crash_in_save", 20, tmp_path)
    assert not checkpoint.fault("crash_in_save", 20, tmp_path)
    assert checkpoint.fault("nan_loss", 3, tmp_path, rank=0)
    assert checkpoint.fault("nan_loss", 3, tmp_path, rank=1)
