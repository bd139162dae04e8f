"""The pipeline: train -> merge -> serve + eval, each stage skippable and re-runnable.

`tune-launch RECIPE` writes the run directory, checks what can be checked before any
process starts (data rows, free disk), hands the plan to a backend, then merges and
evaluates as the recipe asks. Each later stage reads only the run directory, so
`tune-launch merge|serve|eval RUN_DIR` re-runs it on its own.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from cluster.base import Backend, JobRecord, backend_named, choose_backend
from launcher.config.plan import Plan
from launcher.errors import Problem, RecipeError, RunError
from launcher.logs import setup_cli_logging
from launcher.plan_files import write_plan
from launcher.rundir import RunDir
from launcher.tiny import build_base

log = logging.getLogger("tune_launch")
STAGES = ("train", "merge", "serve", "eval")


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


def run_pipeline(plan: Plan, *, stages: list[str], wait: bool, restart: bool = False) -> int:
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise RecipeError(
            [Problem("--stages", f"unknown stage(s) {unknown}", f"use {','.join(STAGES)}")], "usage"
        )
    backend = choose_backend(plan, stages) if "train" in stages else None
    # SLURM: merge and eval are jobs chained after training (cluster/chain.py) that take the
    # run directory's lock themselves, so the chain is followed (--wait) outside it
    chained = backend is not None and backend.name == "slurm"
    setup_cli_logging()
    Path(plan.run_dir).mkdir(parents=True, exist_ok=True)
    with RunDir(plan.run_dir).lock("tune-launch run"):  # a second run here refuses
        if backend is not None:
            code = _train(plan, backend, wait and not chained, restart)
            if code != 0:
                return code
            if not chained and backend.status(Path(plan.run_dir)).state != "COMPLETED":
                return 0  # not finished: the later stages run with `tune-launch merge|eval`
        if not chained:
            return _after_training(plan, stages)
    if wait and backend is not None:
        return backend.wait(Path(plan.run_dir))
    return 0


def _train(plan: Plan, backend: Backend[Any], wait: bool, restart: bool = False) -> int:
    """Check what can be checked before any process starts, write the run directory, then
    submit the request the dry run prints (and follow it with `wait`)."""
    from launcher.data.rows import validate_data
    from launcher.resume import check_resume

    _refuse_live_job(plan)
    check_resume(plan, restart=restart)  # exit 2 on a change the checkpoint cannot take
    validate_data(plan.recipe)  # bad rows / missing files: exit 2 before any process starts
    check_disk(plan)
    _write_run_dir(plan)
    log.info(
        "training %s (%s, %d process(es)) in %s",
        plan.name,
        backend.name,
        plan.world_size,
        plan.run_dir,
    )
    code = backend.submit(backend.prepare(plan))
    if code == 0 and wait:
        code = backend.wait(Path(plan.run_dir))
    return code


def _refuse_live_job(plan: Plan) -> None:
    """A SLURM job outlives the command that submitted it: a second submission into its
    run directory would overwrite its plan and job.json while it trains there."""
    run_dir = Path(plan.run_dir)
    record = JobRecord.load(run_dir)
    if record is None or record.backend != "slurm":
        return
    state = backend_named(record.backend).status(run_dir).state
    if state in ("PENDING", "RUNNING"):
        raise RunError(
            f"{run_dir} is in use by SLURM job {record.job_id} ({state}): wait for it, stop it "
            f"with `tune-launch cancel {run_dir}`, or choose another --run-dir"
        )


def _after_training(plan: Plan, stages: list[str]) -> int:
    """merge, then eval (which serves the model itself), as the recipe and --stages ask."""
    recipe = plan.recipe
    run = RunDir(plan.run_dir)
    from cluster.stages import wants_merge  # the one rule, for the SLURM chain and here

    if "merge" in stages and wants_merge(plan):
        from launcher.merge.run import merge_run

        merged = merge_run(run.path)
        log.info("merged model: %s", merged)
    if "eval" in stages and recipe.eval.enabled:
        from serve.eval import eval_run

        results = eval_run(run.path)
        log.info("evaluation report: %s", run.eval_report)
        _print_headline(results)
    elif "serve" in stages and recipe.serve.enabled:
        # serve.enabled without eval starts no server here: it says how to start one
        log.info("serve it with: tune-launch serve %s", run.path)
    return 0


def _print_headline(results: dict[str, Any]) -> None:
    for name, metrics in (results.get("metrics") or {}).items():
        if isinstance(metrics, dict) and "exact_match" in metrics:
            print(f"  {name:>14}: exact match {metrics['exact_match']:.3f}", flush=True)
        elif isinstance(metrics, dict):  # scored in-process (serve/reward_eval.py)
            for key in ("reward_accuracy", "accuracy"):
                if key in metrics:
                    print(f"  {name:>14}: {key.replace('_', ' ')} {metrics[key]:.3f}", flush=True)
