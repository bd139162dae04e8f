"""Resuming a streamed run (data.streaming): when a checkpoint's place in the stream can be
found again (launcher/resume.py asks before any process starts; launcher/train/resume.py asks
again on the rank, for a restart or requeue that no launcher checked).

A checkpoint holds no position in a stream. The Trainer (transformers 5) counts a stream's
epoch as train.max_steps optimizer steps, so resuming at step N it reads the stream again
from its start and skips the first N x gradient-accumulation micro-batches of each rank
(accelerate's skip_first_batches), reading, checking, tokenizing and packing them again. The
stream is deterministic (the same source, shuffle buffer and seed give the same rows in the
same order; datasets reshuffles pass e with seed + e), so the rank lands on the row the
interrupted run would have trained next, when:

- the data is the same. data.* is not resumable (launcher/config/resume.py refuses a change of
  data.streaming, data.shuffle_buffer, data.seed or data.train); here: the plan's resolved
  stream (data.shuffle_buffer's default) and a checkpoint trained before data.streaming
  existed, whose recipe cannot say.
- the stream was still in its first pass. Once a pass ended and the next began (the
  checkpoint's trainer_state.json `epoch` above 1), the skip runs off the end of the first
  pass and the resumed run starts the next pass from its beginning, training its first rows a
  second time: refused.
- each optimizer step gets the same rows. The same number of processes and dataloader workers
  split the stream the same way. A new world size is refused: a stream of one shard (every
  local file) is read whole by every rank, each keeping its slice of every global batch
  (accelerate's IterableDatasetShard), so step N trains the stream's rows N x G to
  (N + 1) x G - 1 on any world size (G the global batch, which the plan keeps), but for the
  last batch of a pass: several processes complete it with the pass's first rows, one leaves
  it short (measured on the cpu cpt recipe resumed from 2 processes on 1: every step the same
  rows as the uninterrupted run, but the one where the stream ended, 14 rows against 16, loss
  0.5% apart), and whether a stream ends before train.max_steps is not known ahead. A stream
  of several shards (a hub dataset's files) is split by shard between ranks and between a
  rank's dataloader workers; one shard is read by one worker. New train.dataloader_workers are
  refused for a stream of several shards.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher.config.plan import Plan
from launcher.errors import Problem

RESTART = "start over with --restart (deletes this run's checkpoints) or a new --run-dir"


def trained_epoch(checkpoint: Path) -> float | None:
    """The Trainer's epoch at the checkpoint (trainer_state.json), None when unreadable."""
    try:
        epoch = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))["epoch"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(epoch) if isinstance(epoch, int | float) else None


def past_first_pass(epoch: float | None, where: str, *, steps_left: int) -> list[Problem]:
    """A checkpoint trained after the stream's first pass ended (epoch > 1: the Trainer's
    second epoch had begun; a run that stops at max_steps within its first pass ends at 1.0),
    with steps left to train (a finished run asked again trains nothing)."""
    if epoch is None or epoch <= 1.0 or steps_left <= 0:
        return []
    return [
        Problem(
            "data.streaming",
            f"{where} was trained past the end of the stream (Trainer epoch {epoch:.3f}): a "
            "stream resumes by skipping the steps trained in its first pass, and would start "
            "the next pass over, training its first rows twice",
            f"{RESTART}: a streamed run resumes only within its stream's first pass (keep "
            "train.max_steps x the global batch within its rows, or set data.streaming=false "
            "to read the data whole)",
            True,
        )
    ]


def stream_refusals(
    old: dict[str, Any],
    plan: Plan,
    *,
    step: int,
    epoch: float | None,
    shards: Callable[[], int],
    where: str,
) -> list[Problem]:
    """What a streamed checkpoint of `step` cannot take beyond the recipe compare: `old` the
    plan (as JSON) it was trained under, `epoch` its Trainer epoch, `shards()` the number of
    shards of the stream asked now (called only when the dataloader workers changed)."""
    old_recipe = old.get("recipe") or {}
    old_data, new_data = old_recipe.get("data") or {}, plan.recipe.data
    if "streaming" not in old_data and plan.stream is not None:  # the recipe compare cannot say
        return [
            Problem(
                "data.streaming",
                f"{where} was trained before data.streaming existed, on data read whole",
                f"--set data.streaming=false to resume, or {RESTART}",
                True,
            )
        ]
    old_stream = old.get("stream")
    if plan.stream is None or not isinstance(old_stream, dict):
        return []  # not streamed (a switch is a data.streaming change the compare refuses)
    steps_left = (plan.recipe.train.max_steps or 0) - step
    problems = past_first_pass(epoch, where, steps_left=steps_left)
    for key, value in plan.stream.items():
        trained = old_stream.get(key)
        if trained == value or old_data.get(key) != getattr(new_data, key):
            continue  # the same, or a recipe change the compare already refuses
        problems.append(
            Problem(
                f"data.{key}",
                f"{where} was trained on a stream planned with {key} {trained!r} (a default "
                "of that version); another would order the rows differently",
                f"--set data.{key}={trained} to resume, or {RESTART}",
                value,
            )
        )
    return problems + _split_changed(old, plan, shards, where)


def _split_changed(
    old: dict[str, Any], plan: Plan, shards: Callable[[], int], where: str
) -> list[Problem]:
    """A new world size; new dataloader workers on a stream of several shards."""
    old_recipe = old.get("recipe") or {}
    old_resources, old_train = old_recipe.get("resources") or {}, old_recipe.get("train") or {}
    res, train = plan.recipe.resources, plan.recipe.train
    problems = []
    old_world = old.get("world_size")
    if isinstance(old_world, int) and old_world != plan.world_size:
        name = "nodes" if old_resources.get("nodes", res.nodes) != res.nodes else "gpus_per_node"
        problems.append(
            Problem(
                f"resources.{name}",
                f"{where} was trained on {old_world} processes; at the end of a pass over the "
                f"stream, {plan.world_size} would take another last global batch (accelerate "
                "completes it with the pass's first rows on several processes, leaves it short "
                "on one), and a stream's end is not known ahead",
                f"--set resources.{name}={old_resources.get(name)} to resume, or {RESTART}",
                getattr(res, name),
            )
        )
    old_workers = old.get("dataloader_workers")
    if isinstance(old_workers, int) and old_workers != plan.dataloader_workers:
        count = shards()
        if count > 1:  # one shard is read by one worker, in the same order
            then = old_train.get("dataloader_workers", old_workers)
            problems.append(
                Problem(
                    "train.dataloader_workers",
                    f"{where} was trained with {old_workers} dataloader workers per rank; its "
                    f"stream has {count} shards, split between the workers, so the rows of "
                    "each step depend on how many",
                    f"--set train.dataloader_workers={then} to resume, or {RESTART}",
                    train.dataloader_workers,
                )
            )
    return problems
