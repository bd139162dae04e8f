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
from launcher.errors import Problem, RecipeError, RunError
from launcher.logs import setup_cli_logging
from launcher.rundir import RunDir
from launcher.workflow import compare
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
    if backend == "slurm":
        raise RecipeError(
            [
                Problem(
                    "--backend",
                    "a sweep on SLURM is not built yet: variants run one after the other here",
                    "drop --backend slurm (each variant's recipe may still train on SLURM with "
                    "resources.backend: slurm), or submit the variants as separate runs",
                    backend,
                )
            ],
            "usage",
        )
    del max_parallel  # local variants run one after the other
    sweep_dir.mkdir(parents=True, exist_ok=True)
    state = _load(sweep_dir)
    plans = {v.name: _plan(recipe, sets, v, sweep_dir, backend) for v in variants}
    log.info("sweep of %d variant(s) in %s: %s", len(variants), sweep_dir, ", ".join(plans))
    failed = 0
    for variant in variants:
        entry = state.setdefault(variant.name, {})
        entry |= {"name": variant.name, "overrides": variant.overrides, "same_as": variant.same_as}
        if entry.get("state") == "done" and finished(RunDir(sweep_dir / variant.name)):
            log.info("variant %s: done already", variant.name)
            continue
        code, seconds = _run(plans[variant.name], variant)
        entry |= {"state": "done" if code == 0 else "failed", "exit": code, "wall_s": seconds}
        failed += code != 0
        _save(sweep_dir, state)
    entries = [state[v.name] for v in variants]
    paths = compare.write(sweep_dir, entries)
    log.info("comparison: %s (and %s, %s)", paths["md"], paths["json"].name, paths["png"].name)
    return 1 if failed else 0


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


def _load(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    try:
        found = json.loads((sweep_dir / STATE).read_text())
    except (OSError, ValueError):
        return {}
    return {v["name"]: v for v in found.get("variants", []) if isinstance(v, dict) and "name" in v}


def _save(sweep_dir: Path, state: dict[str, dict[str, Any]]) -> None:
    doc = {"variants": list(state.values())}
    RunDir.write_atomic(sweep_dir / STATE, json.dumps(doc, indent=2) + "\n")


def is_sweep(directory: Path) -> bool:
    return (directory / STATE).is_file()


def print_status(sweep_dir: Path) -> int:
    """One line per variant: state, wall time, final loss, the recipe's metric."""
    state = _load(sweep_dir)
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
