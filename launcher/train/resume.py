"""Resuming on the rank: a checkpoint written by another number of processes, and the
recipe changes launcher/config/resume.py lets a resume apply.

World size. A DDP checkpoint is the same on any world size (the full optimizer state, one
RNG file per rank; a rank without one starts from the seed). A DeepSpeed ZeRO checkpoint is
partitioned by data-parallel rank, and DeepSpeed refuses to load it on another world size.
When the world size changed, rank 0 converts the checkpoint once into DeepSpeed's universal
checkpoint (`deepspeed.checkpoint.ds_to_universal`: every parameter's fp32 weights and Adam
moments as whole tensors), next to the original inside the checkpoint directory, and every
rank loads it with DeepSpeed's `checkpoint.load_universal`. The conversion is done at resume,
not at every save: a save costs what it did, and only a resume on a new world size pays
(docs/benchmarks.md measures it). It is written to a temporary name and renamed into place,
so the checkpoint stays complete and loadable on its old world size whatever happens.

Data position. The Trainer's sampler (accelerate's, seeded by train.seed) orders the whole
data set the same way on any world size, and each optimizer step consumes the next
global_batch_size rows of that order whatever the split into processes x micro-batches x
accumulation; the plan keeps the global batch, so resuming at step N on a new world size
continues at row N x global_batch_size, as the sample log (launcher/train/samples.py) shows.

A stream (data.streaming) is resumed by reading it again from its start and skipping the
steps trained; when that finds its place is launcher/config/resume_stream.py's, checked again
here for a checkpoint past the stream's first pass (check_stream_position).

Learning rate. The scheduler's saved state carries the peak learning rate it was built
with; a resume that changes train.learning_rate rescales it (ScheduleOnResume), so the
schedule continues at the same step with the new peak.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from launcher.config.plan import Plan
from launcher.rundir import Checkpoint, RunDir
from launcher.train.preflight import barrier

log = logging.getLogger("launcher.train")

# DeepSpeed's names inside a checkpoint: `latest` names the tag folder (global_stepN),
# `latest_universal` the universal one
LATEST, LATEST_UNIVERSAL, UNIVERSAL_SUFFIX = "latest", "latest_universal", "_universal"


def trained_plan(checkpoint: Path) -> dict[str, Any] | None:
    try:
        found = json.loads(RunDir.checkpoint_plan(checkpoint).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def trained_world_size(checkpoint: Path) -> int | None:
    """How many processes wrote the checkpoint: its plan copy says; for an older checkpoint,
    its ZeRO optimizer shards (one per data-parallel rank) or its RNG files."""
    plan = trained_plan(checkpoint)
    if plan and isinstance(plan.get("world_size"), int):
        return int(plan["world_size"])
    shards = list(checkpoint.glob("global_step*/*zero_pp_rank_*_optim_states.pt"))
    files = shards or list(checkpoint.glob("rng_state_*.pth"))
    return len(files) or None


def needs_universal(plan: Plan, checkpoint: Checkpoint | None) -> bool:
    if checkpoint is None or not plan.deepspeed:
        return False
    written_by = trained_world_size(checkpoint.path)
    return written_by is not None and written_by != plan.world_size


def prepare(plan: Plan, resume: Checkpoint | None, main: bool) -> bool:
    """True when this run loads `resume` as a universal checkpoint (rank 0 converted it)."""
    universal = needs_universal(plan, resume)
    if universal and main:
        assert resume is not None
        to_universal(resume.path, workers=min(4, os.cpu_count() or 1))
    barrier()
    return universal


def to_universal(checkpoint: Path, *, workers: int) -> Path:
    """checkpoint/global_stepN_universal (and `latest_universal`, written last), converted by
    DeepSpeed's own script; a conversion already there is reused."""
    tag = (checkpoint / LATEST).read_text(encoding="utf-8").strip()
    name = f"{tag}{UNIVERSAL_SUFFIX}"
    target, pointer = checkpoint / name, checkpoint / LATEST_UNIVERSAL
    if target.is_dir() and pointer.is_file() and pointer.read_text().strip() == name:
        log.info("reusing the universal checkpoint %s", target)
        return target
    scratch = checkpoint / ".universal.tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    began = time.monotonic()
    argv = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal"]
    argv += ["--input_folder", str(checkpoint / tag), "--output_folder", str(scratch / name)]
    argv += ["--num_extract_workers", str(workers), "--num_merge_workers", str(workers)]
    argv += ["--inject_missing_state"]  # the Trainer's engine does not record it
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        raise RuntimeError(
            f"converting {checkpoint} to a universal checkpoint failed (exit "
            f"{done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        )
    shutil.rmtree(target, ignore_errors=True)
    os.replace(scratch / name, target)
    RunDir.write_atomic(pointer, name)
    shutil.rmtree(scratch, ignore_errors=True)
    log.info(
        "converted %s to a universal checkpoint in %.1f s (written by %s processes)",
        checkpoint.name,
        time.monotonic() - began,
        trained_world_size(checkpoint),
    )
    return target


class SeparateStepCounters(TrainerCallback):
    """After a universal ZeRO-3 load: DeepSpeed (0.19) gives every parameter group's Adam
    state the same `step` tensor, which torch's AdamW then increments once per group and
    step, so every group but the first uses a wrong bias correction from the first step
    after the resume (measured: the loss drifted 1.6% from the uninterrupted run within 8
    steps). Each group gets its own copy before the first step."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        seen: set[int] = set()
        copies = 0
        for optimizer in _torch_optimizers(kwargs.get("optimizer")):
            for param_state in optimizer.state.values():
                step = param_state.get("step")
                if not isinstance(step, torch.Tensor):
                    continue
                if id(step) in seen:
                    param_state["step"] = step.clone()
                    copies += 1
                seen.add(id(param_state["step"]))
        if copies:
            log.info("universal load: %d shared optimizer step counter(s) separated", copies)


def _torch_optimizers(wrapper: Any) -> list[Any]:
    """The torch optimizers inside accelerate's / DeepSpeed's wrappers."""
    found, current = [], wrapper
    for _ in range(6):
        if current is None:
            break
        if isinstance(current, torch.optim.Optimizer):
            found.append(current)
        current = getattr(current, "optimizer", None)
    return found


class ScheduleOnResume(TrainerCallback):
    """On a resume that changes train.learning_rate: the loaded scheduler's peak (base_lrs)
    and the optimizer's current rate are rescaled to the new peak, at the same step."""

    def __init__(self, trained_lr: float, asked_lr: float) -> None:
        self.ratio = asked_lr / trained_lr

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        scheduler, optimizer = kwargs.get("lr_scheduler"), kwargs.get("optimizer")
        if scheduler is None or optimizer is None or self.ratio == 1.0:
            return
        scheduler.base_lrs = [lr * self.ratio for lr in scheduler.base_lrs]
        lambdas = getattr(scheduler, "lr_lambdas", None)
        for i, group in enumerate(optimizer.param_groups):
            if lambdas is not None and i < len(scheduler.base_lrs):
                group["lr"] = scheduler.base_lrs[i] * lambdas[i](scheduler.last_epoch)
            else:
                group["lr"] *= self.ratio
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        log.info(
            "learning rate rescaled x%.4g on resume: now %.4g at step %d",
            self.ratio,
            optimizer.param_groups[0]["lr"],
            state.global_step,
        )


def check_stream_position(plan: Plan, resume: Checkpoint | None) -> None:
    """A streamed run's resume point on the rank (a restart or requeue the launcher did not
    check): RecipeError when the checkpoint was trained past the stream's first pass, where
    the Trainer's skip cannot find its place (launcher/config/resume_stream.py)."""
    from launcher.config.resume_stream import past_first_pass, trained_epoch
    from launcher.errors import RecipeError

    if plan.stream is None or resume is None:
        return
    where = f"{resume.path.name} (step {resume.step})"
    steps_left = (plan.recipe.train.max_steps or 0) - resume.step
    problems = past_first_pass(trained_epoch(resume.path), where, steps_left=steps_left)
    if problems:
        raise RecipeError(problems, f"cannot resume {resume.path.parent.parent} from {where}")


def schedule_callback(plan: Plan, resume: Checkpoint | None) -> ScheduleOnResume | None:
    trained = trained_plan(resume.path) if resume else None
    if not trained:
        return None
    trained_lr = trained.get("recipe", {}).get("train", {}).get("learning_rate")
    asked = plan.recipe.train.learning_rate
    if not isinstance(trained_lr, int | float) or trained_lr == asked:
        return None
    return ScheduleOnResume(float(trained_lr), asked)
