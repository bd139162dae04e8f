"""Multi-stage runs: one workflow file names the stages in order, each later stage starting
from the previous stage's result.

    name: three-stage
    model: {name_or_path: tiny:llama, dtype: fp32}   # every section but `stages` is shared
    resources: {...}
    stages:
      - name: cpt                                      # a recipe section per stage,
        method: {kind: full}                           # merged over the shared sections
        data: {train: data/cpt.jsonl, format: text}
      - name: sft
        recipe: sft.yaml                               # or a recipe file, relative to this one
      - name: dpo
        ...

`tune-launch WORKFLOW.yaml --run-dir DIR` runs stage k in DIR/stages/<k>-<name>/ with
`model.name_or_path` set to stage k-1's result: its merged model when it trained an adapter
(the merge is switched on for every stage but the last), its final weights after full
fine-tuning. `--set` applies to every stage. DIR/workflow.json records each stage's state and
the model it started from (path and COMPLETE marker). A stage that fails stops the chain;
running the same command again skips the finished stages and continues from the first
unfinished one (resuming it from its last checkpoint).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from launcher.config.arch import refuse_missing_model
from launcher.config.load import plan_from_data
from launcher.config.plan import Plan
from launcher.config.recipe import parse_yaml, recipe_from_data
from launcher.errors import Problem, RecipeError
from launcher.logs import setup_cli_logging
from launcher.rundir import RunDir
from launcher.workflow.records import load_records, save_records

log = logging.getLogger("tune_launch")
STATE = "workflow.json"


def is_workflow(path: str | Path) -> bool:
    """A YAML file whose top level has `stages:`."""
    try:
        data = parse_yaml(Path(path).read_text(encoding="utf-8", errors="replace"), str(path))
    except (OSError, RecipeError):
        return False
    return isinstance(data, dict) and "stages" in data


def load_stages(path: Path) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    """(workflow name, [(stage name, the stage's recipe mapping)]), every problem listed."""
    data = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    stages, problems = data.get("stages"), []
    if not isinstance(stages, list) or not stages:
        raise RecipeError(
            [
                Problem(
                    "stages",
                    "a non-empty list of stages",
                    "see launcher/workflow/stages.py",
                    stages,
                )
            ],
            str(path),
        )
    shared = {k: v for k, v in data.items() if k != "stages"}
    name = str(shared.pop("name", path.stem))
    out: list[tuple[str, dict[str, Any]]] = []
    for i, stage in enumerate(stages):
        where = f"stages[{i}]"
        if not isinstance(stage, dict) or not isinstance(stage.get("name"), str):
            problems.append(Problem(where, "a mapping with a `name`", "e.g. - name: sft", stage))
            continue
        section = {k: v for k, v in stage.items() if k not in ("name", "recipe")}
        if "recipe" in stage:
            file = (path.parent / str(stage["recipe"])).resolve()
            if not file.is_file():
                problems.append(
                    Problem(
                        f"{where}.recipe",
                        "file not found",
                        "a path relative to the workflow file",
                        stage["recipe"],
                    )
                )
                continue
            section = _merge(parse_yaml(file.read_text(encoding="utf-8"), str(file)) or {}, section)
        recipe = _merge(copy.deepcopy(shared), section)
        recipe["name"] = f"{name}-{stage['name']}"
        recipe.pop("run_dir", None)
        out.append((stage["name"], recipe))
    if problems:
        raise RecipeError(problems, str(path))
    return name, out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _merge(base[key], value)
        else:
            base[key] = value
    return base


def stage_dir(run_dir: Path, index: int, name: str) -> Path:
    return run_dir / "stages" / f"{index}-{name}"


def check_stages(path: Path, sets: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Every stage's recipe validated before the first stage starts (every problem listed);
    a later stage's plan is resolved when it starts, from its predecessor's result."""
    _, stages = load_stages(path)
    problems: list[Problem] = []
    for index, (name, recipe) in enumerate(stages):
        try:
            recipe_from_data(copy.deepcopy(recipe), f"{path} stage {name}", sets)
        except RecipeError as exc:
            problems += [_in_stage(index, name, p) for p in exc.problems]
    if problems:
        raise RecipeError(problems, str(path))
    return stages


def _in_stage(index: int, name: str, p: Problem) -> Problem:
    return Problem(f"stages[{index}] ({name}): {p.path}", p.message, p.fix)


def stage_plan(
    path: Path, run_dir: Path, sets: list[str], stages: list[tuple[str, dict[str, Any]]], index: int
) -> Plan:
    """Stage `index`'s plan: from its predecessor's result, merged unless it is the last."""
    name, recipe = stages[index]
    overrides = list(sets)
    if index:
        prev_name, prev = stages[index - 1]
        kind = recipe_from_data(copy.deepcopy(prev), str(path), sets).method.kind
        prev_run = RunDir(stage_dir(run_dir, index - 1, prev_name))
        start = prev_run.final if kind == "full" else prev_run.merged
        overrides.append(f"model.name_or_path={start}")
    if index < len(stages) - 1:
        overrides.append("merge.enabled=true")  # the next stage starts from the merge
    elif index:  # the last stage is scored against the first stage's base, not its own
        overrides.append(f"eval.baseline_model={first_base(path, run_dir, sets, stages)}")
    try:
        return plan_from_data(
            copy.deepcopy(recipe),
            f"{path} stage {name}",
            path.parent,
            overrides,
            stage_dir(run_dir, index, name),
        )
    except RecipeError as exc:
        raise RecipeError([_in_stage(index, name, p) for p in exc.problems], str(path)) from None


def first_base(
    path: Path, run_dir: Path, sets: list[str], stages: list[tuple[str, dict[str, Any]]]
) -> str:
    """The first stage's base model (its tiny base in its run directory, or the recipe's)."""
    name, recipe = stages[0]
    model = recipe_from_data(copy.deepcopy(recipe), str(path), sets).model.name_or_path
    if model.startswith("tiny:"):
        return str(RunDir(stage_dir(run_dir, 0, name)).base)
    local = (path.parent / model).resolve()
    return str(local) if local.exists() else model


def run_workflow(path: Path, run_dir: Path, sets: list[str]) -> int:
    """The stages in order from the first unfinished one. Locally each runs to its end; on
    SLURM the first unfinished stage's chain is queued with, after it (`afterok`), a small job
    that runs this same function again on the cluster: it queues the next stage from the
    result that now exists, and so on, unattended."""
    setup_cli_logging()
    stages = check_stages(path, sets)
    names = [name for name, _ in stages]
    run_dir.mkdir(parents=True, exist_ok=True)
    state = load_records(run_dir / STATE, "stages")
    for index, name in enumerate(names):
        plan = stage_plan(path, run_dir, sets, stages, index)
        run = RunDir(plan.run_dir)
        entry = state.setdefault(name, {"name": name, "run_dir": str(run.path)})
        if _finished(run, plan):
            entry["state"] = "done"
            save_records(run_dir / STATE, "stages", state)
            log.info("stage %d/%d (%s): done already", index + 1, len(names), name)
            continue
        if entry.get("state") == "queued" and _live(run):
            log.info(
                "stage %d/%d (%s) is queued: tune-launch status %s",
                index + 1,
                len(names),
                name,
                run_dir,
            )
            return 0
        code = _start(path, plan, index, names, entry)
        done = code == 0 and _finished(run, plan)
        entry["state"] = "done" if done else ("queued" if code == 0 else "failed")
        save_records(run_dir / STATE, "stages", state)
        if done:
            continue
        if code != 0:
            log.error(
                "stage %d/%d (%s) failed: the later stages did not start; run the same command "
                "again to continue",
                index + 1,
                len(names),
                name,
            )
            return code
        entry["jobs"] = _jobs(run)
        if index + 1 < len(names) and entry["jobs"]:
            after = entry["jobs"][-1]
            entry["next_job"] = _submit_next(path, run_dir, sets, plan, after, names[index + 1])
        save_records(run_dir / STATE, "stages", state)
        log.info(
            "stage %d/%d (%s) queued on SLURM; the later stages follow it unattended: "
            "tune-launch status %s",
            index + 1,
            len(names),
            name,
            run_dir,
        )
        return 0
    log.info(
        "workflow %s: %d stage(s) done; the last stage's results are in %s",
        path.name,
        len(names),
        RunDir(state[names[-1]]["run_dir"]).path,
    )
    return 0


def _start(path: Path, plan: Plan, index: int, names: list[str], entry: dict[str, Any]) -> int:
    """Check where the stage starts from, then run (or queue) its pipeline."""
    from launcher.pipeline import STAGES, run_pipeline

    if index:
        start = Path(plan.recipe.model.name_or_path)
        marker = RunDir.read_marker(start)
        if marker is None:
            problem = Problem(
                f"stages[{index}]",
                f"the previous stage's result {start} is not complete",
                "run the previous stage first",
            )
            raise RecipeError([problem], str(path))
        entry["starts_from"] = {"path": str(start), "marker": marker}
    refuse_missing_model(plan.recipe.model.name_or_path, plan.recipe.name)
    log.info(
        "stage %d/%d (%s) in %s, from %s",
        index + 1,
        len(names),
        names[index],
        plan.run_dir,
        plan.recipe.model.name_or_path,
    )
    return run_pipeline(plan, stages=list(STAGES), wait=False)


def _jobs(run: RunDir) -> list[str]:
    from cluster.base import JobRecord
    from cluster.chain import chain_of

    record = JobRecord.load(run.path)
    if record is None or record.backend != "slurm":
        return []
    return [str(job["job_id"]) for job in chain_of(record)]


def _live(run: RunDir) -> bool:
    from cluster.base import JobRecord, backend_named

    record = JobRecord.load(run.path)
    if record is None or record.backend != "slurm":
        return False
    return backend_named("slurm").status(run.path).state in ("PENDING", "RUNNING")


def _submit_next(
    path: Path, run_dir: Path, sets: list[str], plan: Plan, after: str, name: str
) -> str:
    """NAME-next: after the stage's chain succeeds, run_workflow on the cluster (1 CPU)."""
    from launcher.workflow.slurm_jobs import submit_after

    return submit_after(
        run_dir / "slurm",
        plan,
        f"{plan.recipe.name}-next",
        f"afterok:{after}",
        run_workflow,
        path,
        run_dir,
        sets,
    )


def _finished(run: RunDir, plan: Plan) -> bool:
    if not RunDir.is_complete(run.final):
        return False
    if (
        plan.recipe.merge.enabled
        and plan.recipe.method.kind != "full"
        and not RunDir.is_complete(run.merged)
    ):
        return False
    return not plan.recipe.eval.enabled or run.eval_results.is_file()


def dry_run(path: Path, run_dir: Path, sets: list[str]) -> int:
    """Every stage's recipe checked; the plan of each stage that can be planned now (the
    first, and those whose predecessor has finished) printed as `--dry-run` prints it."""
    from cluster.base import choose_backend
    from launcher.config.plan_view import dry_run_text
    from launcher.plan_files import write_plan

    stages = check_stages(path, sets)
    for index, (name, _) in enumerate(stages):
        print(f"=== stage {index + 1}/{len(stages)}: {name}")
        try:
            plan = stage_plan(path, run_dir, sets, stages, index)
        except RecipeError:
            if not index:
                raise
            print("planned when the previous stage has finished (it starts from its result)\n")
            continue
        request = choose_backend(plan).prepare(plan)
        print(dry_run_text(plan, write_plan(plan), request.render()))
    return 0


def is_workflow_dir(run_dir: Path) -> bool:
    return (run_dir / STATE).is_file()


def print_status(run_dir: Path) -> int:
    """One line per stage: state, its run directory, last step, the model it started from."""
    state = load_records(run_dir / STATE, "stages")
    print(f"workflow {run_dir}: {len(state)} stage(s) started")
    for name, entry in state.items():
        run = RunDir(entry["run_dir"])
        step = run.last_step()
        if entry.get("state") == "queued" and _jobs(run):  # on SLURM: what its chain says now
            from cluster.base import backend_named

            entry["state"] = backend_named("slurm").status(run.path).state.lower()
        start = (entry.get("starts_from") or {}).get("path", "the recipe's model")
        print(
            f"  {name:<12} {entry.get('state', '-'):<8} step {step if step is not None else '-':>5}"
            f"  {run.path}  (from {start})"
        )
    return 0
