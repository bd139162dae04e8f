"""`tune-launch sweep RECIPE --grid KEY=V1,V2 ... [--sweep-dir DIR]`: every variant of the
grids (launcher/workflow/variants.py) is a complete run of the recipe's stages in
DIR/<variant>/, one after the other, then DIR/comparison.{json,md,png}
(launcher/workflow/compare.py). DIR/sweep.json records each variant's overrides, state and
wall time as it goes: running the same command again skips the finished variants and resumes
an unfinished one from its last checkpoint. `tune-launch status DIR` shows it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from launcher.config.arch import refuse_missing_model
from launcher.config.load import plan_from_file
from launcher.errors import RecipeError, RunError
from launcher.logs import setup_cli_logging
from launcher.rundir import RunDir
from launcher.workflow import compare
from launcher.workflow.records import load_records, save_records
from launcher.workflow.variants import Variant, expand, parse_grids

log = logging.getLogger("tune_launch")
STATE = "sweep.json"


def run_sweep(
    recipe: Path,
    grids: list[str],
    sets: list[str],
    sweep_dir: Path,
    *,
    backend: str | None,
    max_parallel: int,
) -> int:
    setup_cli_logging()
    variants = expand(recipe, parse_grids(grids), sets)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    state = load_records(sweep_dir / STATE, "variants")
    plans = {v.name: _plan(recipe, sets, v, sweep_dir, backend) for v in variants}
    log.info("sweep of %d variant(s) in %s: %s", len(variants), sweep_dir, ", ".join(plans))
    for variant in variants:
        entry = state.setdefault(variant.name, {})
        entry |= {"name": variant.name, "overrides": variant.overrides, "same_as": variant.same_as}
    if backend == "slurm":
        return _queue(recipe, sets, variants, state, sweep_dir, max_parallel)
    failed = 0
    for variant in variants:
        entry = state[variant.name]
        if entry.get("state") == "done" and finished(RunDir(sweep_dir / variant.name)):
            log.info("variant %s: done already", variant.name)
            continue
        code, seconds = _run(plans[variant.name], variant)
        entry |= {"state": "done" if code == 0 else "failed", "exit": code, "wall_s": seconds}
        failed += code != 0
        save_records(sweep_dir / STATE, "variants", state)
    write_comparison(sweep_dir)
    return 1 if failed else 0


def write_comparison(sweep_dir: Path) -> None:
    """comparison.{json,md,png} from sweep.json and the variants' run directories."""
    setup_cli_logging()
    state = load_records(sweep_dir / STATE, "variants")
    for name, entry in state.items():  # a SLURM variant is done when its run says so
        if entry.get("state") == "queued" and finished(RunDir(sweep_dir / name)):
            entry["state"] = "done"
            entry["wall_s"] = _slurm_seconds(entry.get("jobs") or [])
    save_records(sweep_dir / STATE, "variants", state)
    paths = compare.write(sweep_dir, list(state.values()))
    log.info("comparison: %s (and %s, %s)", paths["md"], paths["json"].name, paths["png"].name)


def _slurm_seconds(jobs: list[str]) -> float | None:
    """The chain's jobs' elapsed time, summed (queue time left out), as SLURM reports it."""
    from cluster.chain import query_jobs

    states, _ = query_jobs(jobs)
    total = 0.0
    for info in states.values():
        days, _, clock = info.elapsed.rpartition("-")
        parts = [float(x) for x in clock.split(":") if x]
        if not parts:
            return None
        seconds = sum(v * 60**i for i, v in enumerate(reversed(parts)))
        total += seconds + 86400 * float(days or 0)
    return round(total, 1) if states else None


def _queue(
    recipe: Path,
    sets: list[str],
    variants: list[Variant],
    state: dict[str, dict[str, Any]],
    sweep_dir: Path,
    max_parallel: int,
) -> int:
    """On SLURM: every unfinished variant's chain (train -> merge -> eval) queued at once, the
    (i + max_parallel)-th starting after the i-th chain has ended (`--dependency=afterany`),
    then a NAME-compare job after all of them writes the comparison."""
    from cluster.base import JobRecord
    from cluster.chain import chain_of
    from launcher.pipeline import STAGES, run_pipeline

    last: list[str | None] = []
    for i, variant in enumerate(variants):
        entry = state[variant.name]
        if entry.get("state") == "done" and finished(RunDir(sweep_dir / variant.name)):
            log.info("variant %s: done already", variant.name)
            last.append(None)
            continue
        before = last[i - max_parallel] if i >= max_parallel else None
        extra = [f"resources.sbatch_extra.dependency=afterany:{before}"] if before else []
        plan = _plan(recipe, [*sets, *extra], variant, sweep_dir, "slurm")
        if run_pipeline(plan, stages=list(STAGES), wait=False) != 0:
            entry["state"] = "failed"
            save_records(sweep_dir / STATE, "variants", state)
            return 1
        record = JobRecord.load(Path(plan.run_dir))
        jobs = [str(job["job_id"]) for job in chain_of(record)] if record else []
        entry |= {"state": "queued", "jobs": jobs}
        last.append(jobs[-1] if jobs else None)
        save_records(sweep_dir / STATE, "variants", state)
    after = [job for job in last if job]
    if after:
        job = _submit_compare(
            sweep_dir, after, _plan(recipe, sets, variants[0], sweep_dir, "slurm")
        )
        log.info(
            "queued %d variant chain(s), at most %d at once; comparison job %s after them: "
            "tune-launch status %s",
            len(after),
            max_parallel,
            job,
            sweep_dir,
        )
    else:
        write_comparison(sweep_dir)
    return 0


def _submit_compare(sweep_dir: Path, after: list[str], plan: Any) -> str:
    """NAME-compare: after every variant's chain, whatever its end, writes the comparison."""
    from launcher.workflow.slurm_jobs import submit_after

    name = f"{plan.recipe.name}-compare"
    dependency = "afterany:" + ":".join(after)
    return submit_after(sweep_dir / "slurm", plan, name, dependency, write_comparison, sweep_dir)


def _plan(
    recipe: Path, sets: list[str], variant: Variant, sweep_dir: Path, backend: str | None
) -> Any:
    plan = plan_from_file(
        recipe, [*sets, *variant.overrides], backend=backend, run_dir=sweep_dir / variant.name
    )
    refuse_missing_model(plan.recipe.model.name_or_path, plan.recipe.name)
    return plan


def _run(plan: Any, variant: Variant) -> tuple[int, float]:
    """The variant's whole pipeline (train, merge, eval as its recipe asks), waited for."""
    from launcher.pipeline import STAGES, run_pipeline

    log.info("variant %s: %s", variant.name, " ".join(variant.overrides) or "(the recipe)")
    began = time.monotonic()
    try:
        code = run_pipeline(plan, stages=list(STAGES), wait=True)
    except (RunError, RecipeError) as exc:
        log.error("variant %s failed: %s", variant.name, exc)
        code = 2 if isinstance(exc, RecipeError) else 1
    return code, round(time.monotonic() - began, 1)


def finished(run: RunDir) -> bool:
    """The variant's stages are all done: its final model, and its eval when it evaluates."""
    if not RunDir.is_complete(run.final):
        return False
    try:
        plan = run.load_plan()
    except (OSError, ValueError):
        return False
    return not plan.recipe.eval.enabled or run.eval_results.is_file()


def is_sweep(directory: Path) -> bool:
    return (directory / STATE).is_file()


def print_status(sweep_dir: Path) -> int:
    """One line per variant: state, wall time, final loss, the recipe's metric."""
    state = load_records(sweep_dir / STATE, "variants")
    report = (
        json.loads((sweep_dir / "comparison.json").read_text())
        if (sweep_dir / "comparison.json").is_file()
        else {}
    )
    rows = report.get("variants", {})
    print(f"sweep {sweep_dir}: {len(state)} variant(s); best: {report.get('best') or '-'}")
    for name, entry in state.items():
        run = RunDir(sweep_dir / name)
        row = rows.get(name, {})
        step = run.last_step()
        if entry.get("state") == "queued":  # on SLURM: what its chain says now
            from cluster.base import backend_named

            entry["state"] = backend_named("slurm").status(run.path).state.lower()
        metric = row.get("metric")
        print(
            f"  {name:<28} {entry.get('state', 'pending'):<8} step {step if step is not None else '-':>5}"
            f"  wall {entry.get('wall_s', '-')} s"
            + (
                f"  {row.get('metric_name')}: {metric:.4g}"
                if isinstance(metric, int | float)
                else ""
            )
        )
    return 0
