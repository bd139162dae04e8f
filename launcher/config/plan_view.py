"""How a plan is shown: the JSON summary, the readable table, the dry-run text."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from launcher.config.methods import get_method
from launcher.config.plan import Plan
from launcher.config.schema import MethodConfig, TrainConfig
from launcher.rundir import RunDir


def plan_summary(plan: Plan) -> dict[str, Any]:
    """The `tune-launch plan --json` document."""
    return {
        "name": plan.name,
        "run_dir": plan.run_dir,
        "world_size": plan.world_size,
        "nodes": plan.nodes,
        "gpus_per_node": plan.gpus_per_node,
        "accelerator": "gpu" if plan.on_gpu else "cpu",
        "method": plan.recipe.method.kind,
        "objective": plan.objective,
        "objective_args": plan.objective_args,
        "strategy": plan.recipe.distributed.strategy,
        "micro_batch_size": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "global_batch_size": plan.global_batch_size,
        "quant_storage": plan.quant_storage,
        "deepspeed": plan.deepspeed,
        "fsdp": plan.fsdp,
        "accelerate": plan.accelerate,
        "memory": plan.memory,
        "launch": plan.launch,
        "env": plan.env,
        "serve": plan.serve,
        "warnings": plan.warnings,
    }


def _rows(rows: list[tuple[str, Any]]) -> list[str]:
    width = max(len(k) for k, _ in rows)
    return [f"  {k.ljust(width)}  {v}" for k, v in rows]


def plan_table(plan: Plan) -> str:
    r = plan.recipe
    out = [f"plan {plan.name}  ->  {plan.run_dir}", "", "batch"]
    out += _rows(
        [
            (
                "world size",
                f"{plan.nodes} node(s) x {plan.gpus_per_node} {'GPU' if plan.on_gpu else 'CPU process'}(s) = {plan.world_size}",
            ),
            ("micro batch", plan.micro_batch_size),
            ("grad accumulation", plan.gradient_accumulation_steps),
            (
                "global batch",
                f"{plan.micro_batch_size} x {plan.gradient_accumulation_steps} x {plan.world_size} = {plan.global_batch_size}",
            ),
            ("sequence length", r.data.max_seq_len or "no truncation"),
            *(
                [("data", "streamed, shuffle buffer {shuffle_buffer}, seed {seed}".format(**s))]
                if (s := plan.stream)
                else []
            ),
        ]
    )
    out += ["", "training"]
    out += _rows(
        [
            ("model", r.model.name_or_path),
            ("method", _method_line(r.method)),
            (
                "objective",
                " ".join([plan.objective, *(f"{k}={v}" for k, v in plan.objective_args.items())])
                + (f", head dropout {r.model.head_dropout}" if r.model.head_dropout else ""),
            ),
            (
                "strategy",
                r.distributed.strategy
                + (" + optimizer offload" if r.distributed.offload_optimizer else "")
                + (" + param offload" if r.distributed.offload_params else ""),
            ),
            (
                "precision",
                f"weights {r.model.dtype}, compute {r.train.precision}"
                + (f", 4-bit storage {plan.quant_storage}" if plan.quant_storage else "")
                + (", 8-bit base" if r.method.kind == "qlora" and r.method.quant.bits == 8 else "")
                + (f", adapters {plan.adapter_dtype}" if plan.adapter_dtype else ""),
            ),
            ("optimizer", _optimizer_line(r.train)),
            ("checkpointing", "on" if r.train.gradient_checkpointing else "off"),
        ]
    )
    if plan.memory:
        m = plan.memory
        out += ["", "memory (estimate)"]
        rows = [(k, f"{v:.2f} GiB") for k, v in m["breakdown_gib"].items()]
        rows += [
            (
                "per GPU" if plan.on_gpu else "per process",
                f"{m['per_gpu_gib']:.2f} GiB"
                + (f" of {r.resources.gpu_memory_gib} GiB" if plan.on_gpu else ""),
            ),
            ("parameters", f"{m['params']:,} ({m['trainable_params']:,} trainable)"),
            ("host RAM to load", f"{m['host_ram_load_gib_per_node']:.2f} GiB per node"),
            ("host RAM to merge", f"{m['host_ram_merge_gib']:.2f} GiB (streaming)"),
            ("checkpoint size", f"{m['checkpoint_bytes'] / 1e9:.2f} GB"),
        ]
        out += _rows(rows)
    out += [
        "",
        "serving",
        *_rows(
            [("tensor parallel", f"{plan.serve['tensor_parallel_size']} ({plan.serve['reason']})")]
        ),
    ]
    out += ["", "launch (per node)", "  " + shlex.join(plan.launch)]
    if plan.warnings:
        out += ["", "warnings", *(f"  ! {w}" for w in plan.warnings)]
    return "\n".join(out)


def dry_run_text(plan: Plan, written: dict[str, Path], request: str) -> str:
    """What would run: the backend's request (cluster/base.py, what submit runs) first, then
    the plan and the files' contents, exactly as written."""
    out = [request, "", plan_table(plan), "", f"run directory written: {plan.run_dir}"]
    run = RunDir(plan.run_dir)
    for path in (run.accelerate_file, run.deepspeed_file, run.launch_script):
        if path.name in written:
            out += ["", f"--- {written[path.name]}", written[path.name].read_text().rstrip()]
    out += ["", "(dry run: nothing was launched)"]
    return "\n".join(out)


def _optimizer_line(t: TrainConfig) -> str:
    """train.optimizer and its weight decay, with the parameters it skips."""
    if not t.weight_decay:
        return t.optimizer
    skips = "every parameter" if t.weight_decay_exempt == "none" else "biases and norms exempt"
    return f"{t.optimizer}, weight decay {t.weight_decay} ({skips})"


def _method_line(m: MethodConfig) -> str:
    """method.kind and the options that apply to it (launcher/config/methods.py)."""
    method = get_method(m.kind)
    options = []
    if method.lora:
        options += [f"r={m.r}", f"alpha={m.alpha}"]
        options += [name for name in ("use_dora", "use_rslora") if getattr(m, name)]
    if method.targets:
        options.append(f"targets={m.target_modules}")
    if method.virtual_tokens:
        options.append(f"virtual tokens={m.num_virtual_tokens}")
    return m.kind + (f" ({', '.join(options)})" if options else "")
