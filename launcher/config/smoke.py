"""`--smoke`: the recipe's exact plan, a few steps, on a tiny model of its architecture.

What stays the recipe's: nodes and processes per node, strategy and offload, method (LoRA /
QLoRA with its rank, targets and 4-bit settings), optimizer, gradient checkpointing,
precision, launcher, partition/account/GPU request, merge. What changes, so it runs in a
minute and checks the plumbing (rendezvous across nodes, ZeRO checkpoints, resume, the
adapter at the end) rather than the model:

- model      tiny:<family> (arch.family of model.architecture, or the model_type
             of a local config.json), built into RUN_DIR/base by the pipeline
- data       a small synthetic data set of the recipe's format (written by smoke_recipe:
             resolve() stays pure; see `smoke_data_path`), max_seq_len 64, packing kept;
             4 validation rows when the recipe validates at all (data.streaming kept: the
             synthetic file is streamed, and read whole as its validation source)
- train      max_steps 6, save_steps 3 (two checkpoints), logging every step, gradient
             accumulation at most 2 (global batch = micro batch x world x that)
- time       at most 30 minutes (a smoke job should not wait behind two-day reservations)
- serve/eval off; the run is named <name>-smoke (its own run directory: a smoke run must
             never leave checkpoints that the real run would resume from)
- precision  fp32 weights and compute (QLoRA compute dtype too) only when
             resources.accelerator is cpu.

--smoke does not switch a GPU recipe to CPU by itself: the submitting host (often a login
node without GPUs) says nothing about the nodes that will run the job. On a CPU-only cluster
pass `--set resources.accelerator=cpu`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from launcher.config import arch
from launcher.config.recipe import Recipe, time_minutes
from launcher.data.formats import Example, get_format
from launcher.errors import Problem, RecipeError

SMOKE_STEPS = 6
SMOKE_SAVE_STEPS = 3
SMOKE_SEQ_LEN = 64
SMOKE_MAX_ACCUMULATION = 2
SMOKE_MAX_MINUTES = 30
SMOKE_ROWS = 160
SMOKE_VALIDATION_ROWS = 4  # enough to run the evaluation path, cheap on a CPU

_WORDS = ["calm", "bright", "dull", "quick", "gentle", "noisy", "warm", "cold", "fine", "odd"]
_GOOD = {"calm", "bright", "quick", "gentle", "warm", "fine"}
_THINGS = ["day", "room", "trip", "meal", "film", "game", "song", "book"]


def _family(recipe: Recipe) -> str:
    name = recipe.model.name_or_path
    if name.startswith("tiny:"):
        return name.removeprefix("tiny:")
    if recipe.model.architecture:
        return arch.family(recipe.model.architecture)
    config = arch.read_local_config(name) or {}
    kind = config.get("model_type")
    if kind in arch.TINY:
        return str(kind)
    raise RecipeError(
        [
            Problem(
                "model.architecture",
                "--smoke needs the model's architecture to build a tiny one, and it is not "
                "known offline (no model.architecture, no local config.json)",
                "set model.architecture to one of " + ", ".join(arch.BUILTIN),
            )
        ],
        f"recipe {recipe.name}",
    )


def synthetic_rows(recipe: Recipe, count: int = SMOKE_ROWS) -> list[dict[str, Any]]:
    """Deterministic rows of the recipe's data format (a toy sentiment task)."""
    data = recipe.data
    fmt = get_format(data.format)
    rows: list[dict[str, Any]] = []
    for i in range(count):
        word = _WORDS[i % len(_WORDS)]
        other = _WORDS[(i // len(_WORDS)) % len(_WORDS)]
        thing = _THINGS[(i // len(_WORDS) ** 2 + i) % len(_THINGS)]
        text = f"the {other} {thing} felt {word}"
        label = "positive" if word in _GOOD else "negative"
        wrong = "negative" if label == "positive" else "positive"
        example = Example("Is this review positive or negative?", text, label, wrong)
        rows.append(fmt.example(example, data))
    return rows


def smoke_run_dir(recipe: Recipe) -> Path:
    """The smoke run's default directory (the CLI's rule: recipe.run_dir or runs/<name>)."""
    return Path(recipe.run_dir or Path("runs") / recipe.name).resolve()


def smoke_data_path(recipe: Recipe) -> Path:
    """Where the synthetic data goes: <smoke run dir>/smoke_data/<format>-<digest>.jsonl.

    Beside the run on the same (shared) file system, named by its content, written once.
    With --run-dir the file still lives under the recipe's default smoke run directory,
    because smoke_recipe runs before the CLI knows --run-dir."""
    digest = hashlib.sha256(json.dumps(synthetic_rows(recipe)).encode()).hexdigest()[:12]
    return smoke_run_dir(recipe) / "smoke_data" / f"{recipe.data.format}-{digest}.jsonl"


def write_smoke_data(recipe: Recipe) -> Path:
    path = smoke_data_path(recipe)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in synthetic_rows(recipe)))
        tmp.replace(path)
    return path


def smoke_recipe(recipe: Recipe) -> Recipe:
    """The smoke version of a (localized, validated) recipe; writes its synthetic data file."""
    family = _family(recipe)
    if family not in arch.TINY:
        raise RecipeError(
            [
                Problem(
                    "model.architecture",
                    f"no tiny model of family {family!r}",
                    "use one of " + ", ".join(arch.TINY),
                    recipe.model.architecture,
                )
            ],
            f"recipe {recipe.name}",
        )
    res, train, method = recipe.resources, recipe.train, recipe.method
    cpu = res.accelerator == "cpu"
    world = res.nodes * res.gpus_per_node
    per_step = train.micro_batch_size * world
    accumulation = max(1, min(SMOKE_MAX_ACCUMULATION, train.global_batch_size // per_step))

    name = (
        (recipe.name[: 64 - len("-smoke")] + "-smoke")
        if not recipe.name.endswith("-smoke")
        else recipe.name
    )
    run_dir = f"{recipe.run_dir.rstrip('/')}-smoke" if recipe.run_dir else None
    renamed = recipe.model_copy(update={"name": name, "run_dir": run_dir})

    model: dict[str, Any] = {"name_or_path": f"tiny:{family}"}
    quant_update: dict[str, Any] = {}
    if cpu:
        model["dtype"] = "fp32"
        if method.quant.compute_dtype not in (None, "fp32"):
            quant_update["compute_dtype"] = "fp32"
        if method.quant.quant_storage in ("bf16", "fp16"):
            quant_update["quant_storage"] = "fp32"
    method_update: dict[str, Any] = {}
    if quant_update:
        method_update["quant"] = method.quant.model_copy(update=quant_update)

    data_path = write_smoke_data(renamed)
    validates = bool(recipe.data.validation or recipe.data.val_split)
    data_update = {
        "train": str(data_path),
        "validation": None,
        "val_split": SMOKE_VALIDATION_ROWS / SMOKE_ROWS if validates else 0.0,
        "max_seq_len": SMOKE_SEQ_LEN,
        "invalid_rows": "error",
    }
    if recipe.data.streaming and validates:  # a stream has no fraction to hold out
        data_update |= {"validation": str(data_path), "val_split": 0.0}
    train_update: dict[str, Any] = {
        "max_steps": SMOKE_STEPS,
        "save_steps": SMOKE_SAVE_STEPS,
        "eval_steps": None,
        "logging_steps": 1,
        "keep_last": max(2, train.keep_last),
        "global_batch_size": per_step * accumulation,
        "early_stopping_patience": None,
    }
    if cpu and train.precision != "fp32":
        train_update["precision"] = "fp32"
    resources_update: dict[str, Any] = {}
    if time_minutes(res.time) > SMOKE_MAX_MINUTES:
        resources_update["time"] = f"00:{SMOKE_MAX_MINUTES:02d}:00"
    smoke = renamed.model_copy(
        update={
            "model": recipe.model.model_copy(update=model),
            "method": method.model_copy(update=method_update),
            "data": recipe.data.model_copy(update=data_update),
            "train": train.model_copy(update=train_update),
            "resources": res.model_copy(update=resources_update),
            "serve": recipe.serve.model_copy(update={"enabled": False}),
            "eval": recipe.eval.model_copy(update={"enabled": False, "data": None}),
        }
    )
    # the schema's checks, once more; only what was given (or changed here) counts as given,
    # as the rules that ask what a recipe says expect
    return Recipe.model_validate(smoke.model_dump(exclude_unset=True))
