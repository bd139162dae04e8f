"""Before any process starts: may this run resume its run directory's last checkpoint?

`tune-launch RECIPE` in a run directory that holds a complete checkpoint resumes from it.
The recipe asked now is compared with the one the checkpoint was trained under
(launcher/config/resume.py decides): a change the checkpoint cannot take is refused (exit 2,
every field with the old and new value and the fix); the others, and a new world size, are
listed in one line and applied; a streamed run has its own conditions
(launcher/config/resume_stream.py). `--restart` starts over in the same directory on purpose.
The resharding itself happens on the rank (launcher/train/resume.py).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from launcher.config.plan import Plan
from launcher.config.resume import compare
from launcher.config.resume_stream import stream_refusals, trained_epoch
from launcher.data.stream import shard_count
from launcher.errors import RecipeError
from launcher.rundir import Checkpoint, RunDir

log = logging.getLogger("tune_launch")


def trained_plan(run: RunDir, checkpoint: Checkpoint) -> dict[str, Any] | None:
    """The plan (as JSON) the checkpoint was trained under: its own copy, or for a checkpoint
    written before copies were kept, the run directory's plan.json (the last run's)."""
    for path in (RunDir.checkpoint_plan(checkpoint.path), run.plan_file):
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(found, dict) and isinstance(found.get("recipe"), dict):
            return found
    return None


def check_resume(plan: Plan, *, restart: bool) -> Checkpoint | None:
    """The checkpoint this run will resume from (None: it starts at step 0); RecipeError when
    the recipe changed in a way that checkpoint cannot take."""
    run = RunDir(plan.run_dir)
    if restart:
        removed = run.reset_training()
        if removed:
            log.info("--restart: removed %s", ", ".join(p.name for p in removed))
        return None
    last = run.last_complete_checkpoint()
    if last is None:
        return None
    old = trained_plan(run, last)
    if old is None:
        log.warning("%s has no plan to compare with; resuming as the recipe says", last.path)
        return last
    where = f"{last.path.name} (step {last.step})"
    verdict = compare(
        old["recipe"],
        plan.recipe.model_dump(mode="json"),
        packing=plan.recipe.data.packing,
        where=where,
    )
    refused = verdict.refused + stream_refusals(
        old,
        plan,
        step=last.step,
        epoch=trained_epoch(last.path),
        shards=lambda: shard_count(plan.recipe),
        where=where,
    )
    if refused:
        raise RecipeError(refused, f"cannot resume {run.path} from {where}")
    changes = list(verdict.applied)
    old_world = old.get("world_size")
    if old_world and old_world != plan.world_size:
        reshard = " (ZeRO state resharded at start)" if plan.deepspeed else ""
        changes.append(f"processes {old_world} -> {plan.world_size}{reshard}")
        old_accumulation = old.get("gradient_accumulation_steps")
        changes.append(
            f"gradient accumulation {old_accumulation} -> {plan.gradient_accumulation_steps} "
            f"(global batch {plan.global_batch_size})"
        )
    log.info(
        "resuming from %s%s",
        where,
        f"; applying: {', '.join(changes)}" if changes else " with the same recipe",
    )
    return last
