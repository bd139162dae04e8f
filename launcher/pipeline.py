"""The pipeline: train -> merge -> serve + eval, each stage skippable and re-runnable.

`tune-launch RECIPE` writes the run directory, checks what can be checked before any
process starts (data rows, free disk), hands the plan to a backend, then merges and
evaluates as the recipe asks. Each later stage reads only the run directory, so
`tune-launch merge|serve|eval RUN_DIR` re-runs it on its own.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from launcher.config.plan import Plan
from launcher.errors import Problem, RecipeError, RunError
from launcher.rundir import RunDir, write_plan
from launcher.tiny import build_base

log = logging.getLogger("tune_launch")
STAGES = ("train", "merge", "serve", "eval")


def select_backend(plan: Plan) -> Any:
    """The recipe's backend; auto = slurm when sbatch exists and more than one node is asked."""
    choice = plan.recipe.resources.backend
    if choice == "auto":
        choice = "slurm" if plan.nodes > 1 and shutil.which("sbatch") else "local"
    if choice == "local" and plan.nodes > 1:
        raise RecipeError(
            [
                Problem(
                    "resources.nodes",
                    "the local backend runs on one node",
                    "use --backend slurm (or --nodes 1)",
                    plan.nodes,
                )
            ],
            "usage",
        )
    if choice == "slurm":
        from cluster.slurm import SlurmBackend

        return SlurmBackend()
    from cluster.local import LocalBackend

    return LocalBackend()


def check_disk(plan: Plan) -> None:
    """Refuse (or warn, by setting) when free disk is short of the checkpoints the plan writes."""
    if not plan.memory:
        return
    keep = plan.recipe.train.keep_last + 1  # the new one is written before the oldest goes
    need = int(plan.memory["checkpoint_bytes"]) * keep
    if plan.recipe.method.kind == "full":
        need += int(plan.memory["weight_bytes"])  # the consolidated final model
    free = shutil.disk_usage(plan.run_dir).free
    if free >= need:
        return
    message = (
        f"free disk {_size(free)} in {plan.run_dir} is short of the "
        f"{_size(need)} the plan's checkpoints need (keep_last={plan.recipe.train.keep_last})"
    )
    if plan.recipe.train.min_free_disk == "warn":
        log.warning(message)
        return
    raise RecipeError(
        [
            Problem(
                "train.keep_last",
                message,
                "free space, use another run_dir, lower train.keep_last, or set train.min_free_disk=warn",
                plan.recipe.train.keep_last,
            )
        ],
        f"recipe {plan.name}",
    )


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _write_run_dir(plan: Plan) -> None:
    """The run directory's files and the tiny base model; a full or read-only disk is a
    failed run with the reason (exit 1), not a traceback."""
    try:
        write_plan(plan)
        build_base(plan)
    except Exception as exc:  # OSError; safetensors raises its own SafetensorError
        hint = ""
        if "No space left" in str(exc) or getattr(exc, "errno", None) == 28:
            hint = "; free disk space or use another --run-dir"
        log.debug("writing %s failed", plan.run_dir, exc_info=True)
        raise RunError(
            f"could not write the run directory {plan.run_dir}: {type(exc).__name__}: {exc}{hint}"
        ) from None


def run_pipeline(plan: Plan, *, stages: list[str], wait: bool) -> int:
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise RecipeError(
            [Problem("--stages", f"unknown stage(s) {unknown}", f"use {','.join(STAGES)}")], "usage"
        )
    _setup_logging()
    backend = select_backend(plan) if "train" in stages else None
    Path(plan.run_dir).mkdir(parents=True, exist_ok=True)
    if backend is None:
        return _stages(plan, backend, stages, wait)
    with RunDir(plan.run_dir).lock(
        "tune-launch run"
    ):  # a second run in this directory refuses here
        if backend.name == "slurm":
            _refuse_live_slurm_job(plan, backend)
        return _stages(plan, backend, stages, wait)


def _refuse_live_slurm_job(plan: Plan, backend: Any) -> None:
    """A SLURM job outlives the command that submitted it: a second submission into its
    run directory would overwrite its plan and job.json while it trains there."""
    from cluster.base import JobRecord

    run_dir = Path(plan.run_dir)
    record = JobRecord.load(run_dir)
    if record is None or record.backend != "slurm":
        return
    state = backend.status(run_dir).state
    if state in ("PENDING", "RUNNING"):
        raise RunError(
            f"{run_dir} is in use by SLURM job {record.job_id} ({state}): wait for it, stop it "
            f"with `tune-launch cancel {run_dir}`, or choose another --run-dir"
        )


def _stages(plan: Plan, backend: Any, stages: list[str], wait: bool) -> int:
    recipe = plan.recipe
    if backend is not None:
        from launcher.data.rows import validate_data

        validate_data(recipe)  # bad rows / missing files: exit 2 before any process starts
        check_disk(plan)
        _write_run_dir(plan)
        log.info(
            "training %s (%s, %d process(es)) in %s",
            plan.name,
            backend.name,
            plan.world_size,
            plan.run_dir,
        )
        code = backend.submit(plan, wait=wait)
        if code != 0:
            return code
        if backend.name == "slurm" and not wait:
            return 0  # queued; later stages run with `tune-launch merge/eval RUN_DIR`
    run_dir = Path(plan.run_dir)
    wants_merge = recipe.method.kind != "full" and (recipe.merge.enabled or recipe.serve.enabled)
    if "merge" in stages and wants_merge and recipe.model.task == "causal_lm":
        from launcher.merge.run import merge_run

        merged = merge_run(run_dir)
        log.info("merged model: %s", merged)
    if "eval" in stages and recipe.eval.enabled:
        from serve.eval import eval_run

        results = eval_run(run_dir)
        log.info("evaluation report: %s", run_dir / "eval" / "report.md")
        _print_headline(results)
    elif "serve" in stages and recipe.serve.enabled:
        log.info("serve it with: tune-launch serve %s", run_dir)
    return 0


def _print_headline(results: dict[str, Any]) -> None:
    for name, metrics in (results.get("metrics") or {}).items():
        if isinstance(metrics, dict) and "exact_match" in metrics:
            print(f"  {name:>14}: exact match {metrics['exact_match']:.3f}", flush=True)


def _setup_logging() -> None:
    for noisy in ("httpx", "httpx2", "openai"):  # one line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            stream=sys.stderr, level=logging.INFO, format="[tune-launch] %(message)s"
        )
