"""Atomic checkpoints, resume discovery, pruning, and the final model.

Layout:
    RUN_DIR/checkpoints/checkpoint-<step>/   complete: carries COMPLETE (written last)
    RUN_DIR/checkpoints/.staging/            where a save is written before its rename
    RUN_DIR/final/                           adapter or full model, tokenizer, generation
                                             config, train_contract.json, COMPLETE

A checkpoint is what the Trainer writes (weights, optimizer/scheduler, RNG of every rank,
trainer state, and under DeepSpeed its own `global_step*/` with ZeRO shards as DeepSpeed
writes them), written under `.staging/` and renamed into place by rank 0 only after every
rank has finished writing and the contents were checked. A crash mid-save leaves at most a
stale `.staging/`, which the next start removes; the previous checkpoint stays complete.

Fault injection for tests: TUNE_LAUNCH_FAULT=<kind>:<step>[,<kind>:<step>] with kinds
`crash_in_save` (rank 0 exits while writing that step's checkpoint), `exit_after_save`
(rank 0 exits right after that step's checkpoint is complete) and `nan_loss` (the loss of
that step is NaN on every rank). A fault fires once per run directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
STAGING = ".staging"
PREFIX = "checkpoint-"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
ADAPTER_FILE = "adapter_model.safetensors"
CONTRACT_FILE = "train_contract.json"


class CheckpointError(RuntimeError):
    """A save that must not be marked complete."""


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    complete: bool


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(root: str | Path) -> list[Checkpoint]:
    """checkpoint-<step> directories under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and child.is_dir():
            found.append(Checkpoint(int(match[1]), child, (child / MARKER).is_file()))
    return sorted(found, key=lambda c: c.step)


def last_complete(root: str | Path) -> Checkpoint | None:
    complete = [c for c in list_checkpoints(root) if c.complete]
    return complete[-1] if complete else None


def clean_partial(root: str | Path) -> list[Path]:
    """Remove the staging area and checkpoint dirs without a marker; returns what was removed."""
    root = Path(root)
    removed = []
    staging = root / STAGING
    if staging.exists():
        shutil.rmtree(staging, ignore_errors=True)
        removed.append(staging)
    for checkpoint in list_checkpoints(root):
        if not checkpoint.complete:
            shutil.rmtree(checkpoint.path, ignore_errors=True)
            removed.append(checkpoint.path)
    return removed


def prune(
    root: str | Path, keep_last: int, protect: set[Path] | frozenset[Path] = frozenset()
) -> list[Path]:
    """Delete complete checkpoints beyond the newest keep_last, never one in protect."""
    complete = [c for c in list_checkpoints(root) if c.complete]
    keep = {c.path.resolve() for c in complete[-keep_last:]} | {p.resolve() for p in protect}
    removed = []
    for checkpoint in complete:
        if checkpoint.path.resolve() not in keep:
            # rename first so a crash mid-delete never leaves a half-deleted "complete" dir
            doomed = checkpoint.path.with_name(f".deleting-{checkpoint.path.name}")
            os.replace(checkpoint.path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(checkpoint.path)
    return removed


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def mark_complete(path: Path, info: dict[str, Any]) -> None:
    """Write the COMPLETE marker (last, after the contents are on disk)."""
    for child in path.rglob("*"):
        if child.is_file():
            with child.open("rb") as fh:
                os.fsync(fh.fileno())
    marker = path / MARKER
    with marker.open("w", encoding="utf-8") as fh:
        json.dump({**info, "time": time.time()}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(path)


def publish(staged: Path, final: Path) -> None:
    """Rename a staged directory into place (replacing a stale one of the same name)."""
    if final.exists():
        stale = final.with_name(f".deleting-{final.name}")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(staged, final)
    _fsync_dir(final.parent)


# --------------------------------------------------------------------------------------------
# Contents checks


def check_adapter(path: Path) -> int:
    """Number of tensors in the adapter file; CheckpointError if it is missing or empty
    (under ZeRO-3 an ungathered save writes an empty adapter)."""
    from safetensors import safe_open

    file = path / ADAPTER_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} was not written")
    with safe_open(str(file), framework="pt") as fh:
        keys = list(fh.keys())
        empty = [
            k
            for k in keys
            if fh.get_slice(k).get_shape() in ([], [0]) or 0 in fh.get_slice(k).get_shape()
        ]
    if not keys or empty:
        raise CheckpointError(
            f"{file} holds {len(keys)} tensors, {len(empty)} of them empty: the adapter was saved "
            "without gathering its ZeRO-3 shards (needs stage3_gather_16bit_weights_on_model_save)"
        )
    return len(keys)


def check_weights(path: Path) -> None:
    names = {p.name for p in path.iterdir()}
    if not ({"model.safetensors", "model.safetensors.index.json"} & names):
        raise CheckpointError(f"no model weights were written to {path}")


# --------------------------------------------------------------------------------------------
# Fault injection (tests)


def fault(kind: str, step: int, run_dir: str | Path, rank: int = 0) -> bool:
    """True once per run directory and rank if TUNE_LAUNCH_FAULT asks for `kind` at `step`."""
    spec = os.environ.get("TUNE_LAUNCH_FAULT", "")
    if f"{kind}:{step}" not in {item.strip() for item in spec.split(",")}:
        return False
    flag = Path(run_dir) / "logs" / f"fault-{kind}-{step}-rank{rank}.fired"
    if flag.exists():
        return False
    flag.parent.mkdir(parents=True, exist_ok=True)
    flag.write_text(str(os.getpid()))
    return True


# --------------------------------------------------------------------------------------------
# The Trainer side


def save_atomically(
    trainer: Any,
    write: Callable[[], None],
    *,
    run_dir: Path,
    extras: Callable[[Path], None],
    keep_last: int,
    protect: set[Path],
) -> Path:
    """Run the Trainer's own checkpoint write into the staging area, then (rank 0, after a
    barrier) check it, mark it COMPLETE, rename it into place and prune old ones."""
    step = trainer.state.global_step
    root = Path(trainer.args.output_dir)
    staged = root / STAGING / f"{PREFIX}{step}"
    final = root / f"{PREFIX}{step}"
    write()  # every rank: weights (rank 0), ZeRO shards / RNG state (each rank)
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        if getattr(trainer.model, "peft_config", None) is not None:
            check_adapter(staged)
        elif not any(staged.glob("global_step*")):
            check_weights(staged)
        extras(staged)
        mark_complete(staged, {"step": step})
        publish(staged, final)
        with contextlib.suppress(OSError):
            staged.parent.rmdir()  # .staging, when empty
        removed = prune(root, keep_last, protect)
        log.info(
            "checkpoint %s complete%s",
            final,
            f"; pruned {', '.join(p.name for p in removed)}" if removed else "",
        )
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save and fault("exit_after_save", step, run_dir):
        log.error("fault injection: exit after the checkpoint of step %d", step)
        os._exit(1)
    return final


def save_final(
    trainer: Any, run_dir: Path, *, shard_size_gb: float, extras: Callable[[Path], None]
) -> Path:
    """RUN_DIR/final: the adapter, or the full model gathered from ZeRO-3 shards into
    safetensors shards; written to final.tmp, marked COMPLETE, renamed. Every rank calls this."""
    final = Path(run_dir) / "final"
    staged = Path(run_dir) / ".final.tmp"
    is_peft = getattr(trainer.model, "peft_config", None) is not None
    if trainer.args.should_save and staged.exists():
        shutil.rmtree(staged)
    trainer.accelerator.wait_for_everyone()
    if is_peft:
        trainer.save_model(str(staged))  # gathers ZeRO-3 adapter shards (collective)
    else:
        wrapped = trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model
        state_dict = trainer.accelerator.get_state_dict(wrapped)  # collective under ZeRO-3
        if trainer.args.should_save:
            model = trainer.accelerator.unwrap_model(trainer.model)
            model.save_pretrained(
                str(staged),
                state_dict=state_dict,
                max_shard_size=max(1, int(shard_size_gb * 1e9)),
            )
        del state_dict
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        if is_peft:
            tensors = check_adapter(staged)
            log.info("final adapter: %d tensors", tensors)
        else:
            check_weights(staged)
        for stray in ("training_args.bin",):
            (staged / stray).unlink(missing_ok=True)
        extras(staged)
        mark_complete(staged, {"step": trainer.state.global_step})
        publish(staged, final)
        log.info("final model written to %s", final)
    trainer.accelerator.wait_for_everyone()
    return final
