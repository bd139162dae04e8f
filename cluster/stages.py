"""The stages after training as SLURM jobs: which follow training, what each asks of SLURM and
what it runs.

    later_stages(plan, stages)      the jobs chained after training: merge, eval (in order)
    stage_parameters(plan, stage)   submitit's sbatch parameters of the merge / eval / serve job
    StageTask(stage, run_dir)       what the merge or eval job runs (pickled by submitit)

The merge job is CPU only, sized by the planner's merge RAM (merge.cpus, merge.mem_gib). The
eval job runs on one node with the GPUs vLLM's tensor parallel size needs (plan.serve, from the
model's size; on a CPU cluster, CPUs only): it starts vLLM through serve/vllm.py (the managed
process of `tune-launch eval`), waits for /health, evaluates on that node, writes RUN_DIR/eval/
and stops the server (serve/eval.py eval_run). The endpoint job of `tune-launch serve
--backend slurm` is cluster/endpoint.py. Each job takes the run directory's lock.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from launcher.config.plan import Plan
from launcher.config.recipe import time_minutes
from launcher.logs import setup_cli_logging
from launcher.rundir import RunDir

ALL_STAGES = ("train", "merge", "serve", "eval")
INTERPRETER_GIB = 4  # python + torch + safetensors in the merge job, on top of the planner's RAM


def job_name(plan_name: str, stage: str) -> str:
    """NAME-train, NAME-merge, NAME-eval, NAME-serve: every job of a run starts with its name."""
    return f"{plan_name}-{stage}"


def wants_merge(plan: Plan) -> bool:
    """A causal LM adapter to fold into its base, for serving or because the recipe asks."""
    recipe = plan.recipe
    return (
        recipe.method.kind != "full"
        and (recipe.merge.enabled or recipe.serve.enabled)
        and recipe.model.task == "causal_lm"
    )


def later_stages(plan: Plan, stages: Sequence[str] = ALL_STAGES) -> list[str]:
    """The stages that follow training for this plan, among `stages` (--stages): merge when
    there is an adapter to merge, eval when the recipe evaluates (eval serves the model
    itself; serve alone is `tune-launch serve RUN_DIR`, a standing endpoint)."""
    found = []
    if "merge" in stages and wants_merge(plan):
        found.append("merge")
    if "eval" in stages and plan.recipe.eval.enabled:
        found.append("eval")
    return found


def _common(plan: Plan) -> dict[str, Any]:
    res = plan.recipe.resources
    params: dict[str, Any] = {"nodes": 1, "ntasks_per_node": 1, "time": time_minutes(res.time)}
    for key in ("partition", "account", "qos"):
        value = getattr(res, key)
        if value:
            params[key] = value
    return params


def serve_gpus(plan: Plan) -> int:
    """GPUs of the eval and serve jobs: vLLM's tensor parallel size (0 on a CPU cluster)."""
    return int(plan.serve.get("tensor_parallel_size") or 1) if plan.on_gpu else 0


def stage_parameters(plan: Plan, stage: str, time: str | None = None) -> dict[str, Any]:
    """submitit's parameters of a stage job (merge, eval, serve); `time` overrides the limit."""
    res = plan.recipe.resources
    params = _common(plan) | {"job_name": job_name(plan.name, stage)}
    if stage == "merge":
        merge = plan.recipe.merge
        params["cpus_per_task"] = merge.cpus or (
            min(8, res.cpus_per_node) if res.cpus_per_node else 2
        )
        mem = merge.mem_gib
        if mem is None and plan.memory:
            mem = math.ceil(float(plan.memory["host_ram_merge_gib"])) + INTERPRETER_GIB
        if mem:
            params["mem"] = f"{mem}G"
    else:  # eval, serve: vLLM on one node
        gpus = serve_gpus(plan)
        if gpus:
            kind = f"{res.gpu_type}:" if res.gpu_type else ""
            params["gres"] = f"gpu:{kind}{gpus}"
        params["cpus_per_task"] = res.cpus_per_node or max(2, 4 * gpus)
        if res.mem_per_node_gib:
            params["mem"] = f"{res.mem_per_node_gib}G"
        if res.constraint:
            params["constraint"] = res.constraint
    if time:
        params["time"] = time_minutes(time)
    return params


def stage_fields(stage: str) -> str:
    """The recipe fields that size a stage's job (named when SLURM refuses the request)."""
    return {
        "train": "resources.nodes / gpus_per_node / cpus_per_node / mem_per_node_gib / partition",
        "merge": "merge.cpus / merge.mem_gib / resources.partition",
        "eval": "resources.cpus_per_node / mem_per_node_gib / gpu_type / serve.tensor_parallel_size",
        "serve": "resources.cpus_per_node / mem_per_node_gib / gpu_type / serve.tensor_parallel_size",
    }[stage]


def say(message: str) -> None:
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    print(f"[tune-launch {node}] {message}", flush=True)


def _setup_logging() -> None:
    logging.getLogger("submitit").propagate = False  # it logs to the job's output itself
    setup_cli_logging(sys.stdout)


class StageTask:
    """The callable submitit runs in the merge or eval job (picklable: two strings)."""

    def __init__(self, stage: str, run_dir: str) -> None:
        if stage not in ("merge", "eval"):
            raise ValueError(f"no SLURM stage task for {stage!r}")
        self.stage = stage
        self.run_dir = str(run_dir)

    def __call__(self) -> dict[str, Any]:
        _setup_logging()
        run = RunDir(self.run_dir)
        job = os.environ.get("SLURM_JOB_ID", "?")
        say(f"stage {self.stage} starts (job {job}) in {run.path}")
        with run.lock(f"SLURM {self.stage} job {job}"):
            if self.stage == "merge":
                from launcher.merge.run import merge_run

                out = merge_run(run.path)
                say(f"stage merge done: {out}")
                return {"merged": str(out)}
            from serve.eval import eval_run

            results = eval_run(run.path)
            for line in eval_headline(results):
                say(line)
            say(f"stage eval done: {run.eval_report}")
            return {"report": str(run.eval_report)}


def eval_headline(results: dict[str, Any]) -> list[str]:
    """One line per evaluated variant: exact match and accuracy."""
    lines = []
    for name, metrics in (results.get("metrics") or {}).items():
        if isinstance(metrics, dict) and "exact_match" in metrics:
            acc = metrics.get("accuracy")
            more = f", accuracy {acc:.3f}" if isinstance(acc, int | float) else ""
            lines.append(f"{name}: exact match {metrics['exact_match']:.3f}{more}")
    return lines
