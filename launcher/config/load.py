"""Recipe file (or a workflow stage's mapping) -> Plan, on the submitting host: load, apply
overrides, make local paths absolute, gather the cluster facts, resolve. Never imports torch.
The command line, sweeps and multi-stage workflows all come through here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from launcher.config import arch
from launcher.config.plan import ClusterFacts, Plan, resolve
from launcher.config.recipe import Recipe, load_recipe, localize, recipe_from_data


def plan_from_file(
    path: str | Path,
    overrides: list[str],
    *,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    backend: str | None = None,
    run_dir: str | Path | None = None,
    smoke: bool = False,
) -> Plan:
    overrides = [*overrides, *([f"resources.backend={backend}"] if backend else [])]
    recipe = load_recipe(path, overrides, nodes=nodes, gpus_per_node=gpus_per_node)
    return plan_for(recipe, Path(path).resolve().parent, run_dir=run_dir, smoke=smoke)


def plan_from_data(
    data: dict[str, Any], source: str, base_dir: Path, overrides: list[str], run_dir: Path
) -> Plan:
    """A recipe given as a mapping (a workflow stage), its relative paths taken from
    base_dir (the workflow file's folder)."""
    recipe = recipe_from_data(data, source, overrides)
    return plan_for(recipe, base_dir, run_dir=run_dir)


def plan_for(
    recipe: Recipe, base_dir: Path, *, run_dir: str | Path | None, smoke: bool = False
) -> Plan:
    recipe = localize(recipe, base_dir)
    if smoke:
        from launcher.config.smoke import smoke_recipe

        recipe = smoke_recipe(recipe)
    where = Path(run_dir or recipe.run_dir or Path("runs") / recipe.name).resolve()
    missing = arch.missing_model(recipe.model.name_or_path)
    facts = ClusterFacts(
        run_dir=str(where),
        python=sys.executable,
        model_config=arch.read_local_config(recipe.model.name_or_path),
        cpus=os.cpu_count() or 1,
        smoke=smoke,
        warnings=[f"{missing}: `tune-launch run` refuses to start it"] if missing else [],
    )
    return resolve(recipe, facts)
