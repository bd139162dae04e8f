"""Atomic checkpoints, resume cleanup, pruning, and the final model (the run directory's
layout and its COMPLETE marker are launcher/rundir.py's).

    RUN_DIR/checkpoints/checkpoint-<step>/   complete: carries COMPLETE (written last)
    RUN_DIR/checkpoints/.staging/            where a save is written before its rename
    RUN_DIR/final/                           adapter or full model, tokenizer, generation
                                             config, train_contract.json, COMPLETE;
                                             written to RUN_DIR/.final.tmp first

A checkpoint is what the Trainer writes (weights, optimizer/scheduler, RNG of every rank,
trainer state, and under DeepSpeed its own `global_step*/` with ZeRO shards as DeepSpeed
writes them), written under `.staging/` and renamed into place by rank 0 only after every
rank has finished writing and the contents were checked. A crash mid-save leaves at most a
stale `.staging/`, which the next start removes; the previous checkpoint stays complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher.data.rows import train_contract
from launcher.rundir import RunDir
from launcher.train import faults

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter_model.safetensors"  # what peft writes


class CheckpointError(RuntimeError):
    """A save that must not be marked complete."""


def clean_partial(run: RunDir) -> list[Path]:
    """Remove the staging area and checkpoint dirs without a marker; returns what was removed."""
    removed = []
    if run.staging.exists():
        shutil.rmtree(run.staging, ignore_errors=True)
        removed.append(run.staging)
    for checkpoint in run.list_checkpoints():
        if not checkpoint.complete:
            shutil.rmtree(checkpoint.path, ignore_errors=True)
            removed.append(checkpoint.path)
    return removed


def prune(
    run: RunDir, keep_last: int, protect: set[Path] | frozenset[Path] = frozenset()
) -> list[Path]:
    """Delete complete checkpoints beyond the newest keep_last, never one in protect."""
    complete = [c for c in run.list_checkpoints() if c.complete]
    keep = {c.path.resolve() for c in complete[-keep_last:]} | {p.resolve() for p in protect}
    removed = []
    for checkpoint in complete:
        if checkpoint.path.resolve() not in keep:
            RunDir.remove(checkpoint.path)
            removed.append(checkpoint.path)
    return removed


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
# The Trainer side


def write_extras(trainer: Any, path: Path) -> None:
    """Saved with every checkpoint and the final model: what serving must reproduce (the
    tokenizer, the generation config of a generative model, train_contract.json)."""
    tokenizer = trainer.processing_class
    tokenizer.save_pretrained(path)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    generation = getattr(unwrapped, "generation_config", None)  # None for a classifier
    if generation is not None:
        generation.save_pretrained(path)
    contract = train_contract(tokenizer, generation)
    RunDir.contract_file(path).write_text(json.dumps(contract, indent=2))


def save_atomically(
    trainer: Any,
    write: Callable[[], None],
    *,
    run: RunDir,
    keep_last: int,
    protect: set[Path],
) -> Path:
    """Run the Trainer's own checkpoint write into the staging area, then (rank 0, after a
    barrier) check it, publish it (COMPLETE, then the rename) and prune old ones."""
    step = trainer.state.global_step
    final = run.checkpoint(step)
    staged = run.staging / final.name
    write()  # every rank: weights (rank 0), ZeRO shards / RNG state (each rank)
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        if getattr(trainer.model, "peft_config", None) is not None:
            check_adapter(staged)
        elif not any(staged.glob("global_step*")):
            check_weights(staged)
        write_extras(trainer, staged)
        shutil.copyfile(run.plan_file, RunDir.checkpoint_plan(staged))  # what a resume compares
        RunDir.publish(staged, final, {"step": step})
        with contextlib.suppress(OSError):
            run.staging.rmdir()  # when empty
        removed = prune(run, keep_last, protect)
        log.info(
            "checkpoint %s complete%s",
            final,
            f"; pruned {', '.join(p.name for p in removed)}" if removed else "",
        )
    trainer.accelerator.wait_for_everyone()
    faults.point("saved", step, run, trainer.args.process_index)
    return final


def save_final(trainer: Any, run: RunDir, *, shard_size_gb: float) -> Path:
    """RUN_DIR/final: the adapter, or the full model gathered from ZeRO-3 shards into
    safetensors shards; written to RUN_DIR/.final.tmp, then published (COMPLETE, then the
    rename). Every rank calls this."""
    staged = run.final_staging
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
        (staged / "training_args.bin").unlink(missing_ok=True)
        write_extras(trainer, staged)
        RunDir.publish(staged, run.final, {"step": trainer.state.global_step})
        log.info("final model written to %s", run.final)
    trainer.accelerator.wait_for_everyone()
    return run.final
