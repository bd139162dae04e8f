"""tune-launch: thin argument parsing, dispatch to the stages.

    tune-launch RECIPE [flags]          same as `tune-launch run RECIPE [flags]`
    tune-launch plan RECIPE [--json]    resolve and print the plan (never imports torch)
    tune-launch tiny ARCH OUT_DIR       write a tiny random model with a tokenizer
    tune-launch merge|serve|eval RUN_DIR
    tune-launch export RUN_DIR --format gguf|int4
    tune-launch status|logs|cancel RUN_DIR

Exit codes: 0 ok, 2 bad recipe or usage (every problem listed, no traceback), 1 a failed run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from launcher.errors import Problem, RecipeError, RunError

COMMANDS = (
    "run",
    "plan",
    "tiny",
    "merge",
    "serve",
    "eval",
    "export",
    "status",
    "logs",
    "cancel",
    "sweep",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2 already; keep its message short
        self.print_usage(sys.stderr)
        raise RecipeError([Problem("", message, f"see `{self.prog} --help`")], "usage")


def _recipe_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--nodes", type=int, help="override resources.nodes")
    p.add_argument("--gpus-per-node", type=int, help="override resources.gpus_per_node")
    p.add_argument(
        "--backend", choices=["auto", "local", "slurm"], help="override resources.backend"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any recipe field, e.g. --set train.learning_rate=1e-4",
    )
    p.add_argument("--run-dir", help="run directory (default: recipe run_dir or runs/<name>)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="the recipe's exact plan, a few steps, on a tiny model of its architecture",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tune-launch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _training_commands(sub)
    plan = sub.add_parser("plan", help="print the resolved plan")
    _recipe_flags(plan)
    plan.add_argument("--json", action="store_true", help="print JSON")

    tiny = sub.add_parser("tiny", help="write a tiny random model of a real architecture")
    tiny.add_argument("arch", help="llama, mistral, qwen2, qwen3 or distilbert")
    tiny.add_argument("out_dir")
    tiny.add_argument(
        "--corpus", action="append", default=[], help="jsonl file(s) for the tokenizer"
    )
    tiny.add_argument("--seed", type=int, default=0)

    _model_commands(sub)
    _job_commands(sub)
    return parser


def _training_commands(sub: Any) -> None:
    """run and sweep: what trains."""
    run = sub.add_parser(
        "run", help="resolve, then train (and merge/serve/eval as the recipe asks)"
    )
    _recipe_flags(run)
    run.add_argument(
        "--dry-run", action="store_true", help="write the run directory, print what would run"
    )
    run.add_argument("--wait", action="store_true", help="slurm: follow the job to its end")
    run.add_argument(
        "--restart",
        action="store_true",
        help="start training over in this run directory (its checkpoints, final and merged "
        "models, metrics and eval are deleted); default: resume from the last checkpoint",
    )
    run.add_argument(
        "--stages",
        default="train,merge,serve,eval",
        help="comma-separated stages to run (default: all the recipe enables)",
    )

    sweep = sub.add_parser("sweep", help="run variants of a recipe and compare them")
    sweep.add_argument("recipe", help="recipe YAML file")
    sweep.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="KEY=V1,V2",
        help="a field and its values; several --grid: every combination",
    )
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sweep.add_argument("--sweep-dir", help="where the variants' run directories go")
    sweep.add_argument("--backend", choices=["local", "slurm"], help="override resources.backend")
    sweep.add_argument("--max-parallel", type=int, default=1, help="slurm: variants at once")


def _model_commands(sub: Any) -> None:
    """merge, serve, eval, export: what a finished run's model goes through."""
    merge = sub.add_parser("merge", help="merge the run's adapter into its base model")
    merge.add_argument("run_dir")
    merge.add_argument(
        "--force", action="store_true", help="merge again even if merged/ is complete"
    )

    serve = sub.add_parser("serve", help="serve a run (or a model directory) with vLLM")
    serve.add_argument("target", help="run directory or model directory")
    serve.add_argument("--port", type=int)
    serve.add_argument("--host")
    serve.add_argument("--engine", choices=["vllm", "vllm-cpu"])
    serve.add_argument("--mode", choices=["merged", "lora"])
    serve.add_argument(
        "--backend",
        choices=["local", "slurm"],
        default="local",
        help="slurm: a standing endpoint as a SLURM job (RUN_DIR only); returns its URL",
    )
    serve.add_argument(
        "--time", help="slurm: the endpoint job's time limit (default resources.time)"
    )

    ev = sub.add_parser("eval", help="evaluate a run against an OpenAI-compatible endpoint")
    ev.add_argument("run_dir")
    ev.add_argument("--endpoint", help="use this endpoint instead of starting a server")

    export = sub.add_parser("export", help="the fine-tuned model as GGUF or INT4, validated")
    export.add_argument("run_dir")
    export.add_argument("--format", required=True, help="gguf (llama.cpp / Ollama) or int4 (vLLM)")
    export.add_argument(
        "--calibration-rows", type=int, help="int4: training rows GPTQ calibrates on (256)"
    )


def _job_commands(sub: Any) -> None:
    """status, cancel, logs: a run's job."""
    for name, text in (("status", "state of the run's job"), ("cancel", "stop the run's job")):
        p = sub.add_parser(name, help=text)
        p.add_argument("run_dir")
        if name == "status":
            p.add_argument("--json", action="store_true", help="print JSON")
    logs = sub.add_parser("logs", help="print a rank's or a stage's log")
    logs.add_argument("run_dir")
    logs.add_argument("--rank", type=int, help="a training rank's log (default 0)")
    logs.add_argument(
        "--stage",
        choices=["train", "merge", "eval", "serve"],
        help="slurm: that stage's job output and logs",
    )
    logs.add_argument("--follow", "-f", action="store_true")


def _resolve(args: argparse.Namespace) -> Any:
    """Load, localize and resolve the recipe named in args -> Plan (no torch imported)."""
    from launcher.config.load import plan_from_file

    return plan_from_file(
        args.recipe,
        list(args.overrides),
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        backend=args.backend,
        run_dir=args.run_dir,
        smoke=args.smoke,
    )


def _print_plan(plan: Any, as_json: bool) -> None:
    from launcher.config.plan_view import plan_summary, plan_table

    if as_json:
        print(json.dumps(plan_summary(plan), indent=2))
    else:
        print(plan_table(plan))


def cmd_plan(args: argparse.Namespace) -> int:
    _print_plan(_resolve(args), args.json)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from launcher.workflow.stages import is_workflow

    if is_workflow(args.recipe):
        return _run_workflow(args)
    plan = _resolve(args)
    if args.dry_run:
        return _dry_run(plan, args)
    from launcher.config import arch

    arch.refuse_missing_model(plan.recipe.model.name_or_path, plan.recipe.name)
    from launcher.pipeline import run_pipeline

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    return run_pipeline(plan, stages=stages, wait=args.wait, restart=args.restart)


def _run_workflow(args: argparse.Namespace) -> int:
    """A multi-stage workflow file (launcher/workflow/stages.py)."""
    from launcher.workflow import stages

    path = Path(args.recipe).resolve()
    unsupported = [
        f for f in ("nodes", "gpus_per_node", "backend", "smoke", "wait") if getattr(args, f)
    ]
    if unsupported or args.restart:
        flags = ", ".join(
            f"--{f.replace('_', '-')}"
            for f in [*unsupported, *(["restart"] if args.restart else [])]
        )
        raise RecipeError(
            [
                Problem(
                    flags,
                    "not taken by a multi-stage workflow",
                    "set resources in the workflow file or with --set resources.KEY=VALUE "
                    "(resources.backend=slurm queues the stages; follow them with "
                    "`tune-launch status RUN_DIR`); delete RUN_DIR to start over",
                )
            ],
            "usage",
        )
    run_dir = Path(args.run_dir or Path("runs") / path.stem).resolve()
    if args.dry_run:
        return stages.dry_run(path, run_dir, list(args.overrides))
    return stages.run_workflow(path, run_dir, list(args.overrides))


def cmd_sweep(args: argparse.Namespace) -> int:
    from launcher.workflow.sweep import run_sweep

    recipe = Path(args.recipe)
    sweep_dir = Path(args.sweep_dir or Path("runs") / f"{recipe.stem}-sweep").resolve()
    return run_sweep(
        recipe,
        args.grid,
        list(args.overrides),
        sweep_dir,
        backend=args.backend,
        max_parallel=args.max_parallel,
    )


def _dry_run(plan: Any, args: argparse.Namespace) -> int:
    """Write the run directory and print the request the run would submit (the backend
    chosen as the run chooses it), then the plan and its files."""
    from cluster.base import choose_backend
    from launcher.config.plan_view import dry_run_text
    from launcher.plan_files import write_plan

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    request = choose_backend(plan, stages).prepare(plan)
    written = write_plan(plan)
    print(dry_run_text(plan, written, request.render()))
    return 0


def cmd_tiny(args: argparse.Namespace) -> int:
    from launcher.tiny import ARCHES, write_tiny

    if args.arch not in ARCHES:
        raise RecipeError(
            [Problem("arch", "unknown architecture", f"use one of {', '.join(ARCHES)}", args.arch)],
            "usage",
        )
    out = write_tiny(args.arch, args.out_dir, corpus_files=args.corpus, seed=args.seed)
    print(f"wrote a tiny {args.arch} model to {out}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from launcher.merge.run import merge_run
    from launcher.rundir import RunDir

    with RunDir(args.run_dir).lock("tune-launch merge"):
        out = merge_run(Path(args.run_dir), force=args.force)
    print(f"merged model: {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from serve.vllm import serve_cli

    if args.backend == "slurm":
        from cluster.endpoint import serve_on_slurm

        if args.host:
            raise RecipeError(
                [Problem("--host", "a SLURM endpoint binds its node's interfaces", "drop --host")],
                "usage",
            )
        return serve_on_slurm(
            Path(args.target),
            time_limit=args.time,
            port=args.port,
            mode=args.mode,
            engine=args.engine,
        )
    return serve_cli(
        Path(args.target),
        port=args.port,
        host=args.host,
        engine=args.engine,
        mode=args.mode,
    )


def cmd_eval(args: argparse.Namespace) -> int:
    from launcher.rundir import RunDir
    from serve.eval import eval_run

    with RunDir(args.run_dir).lock("tune-launch eval"):
        eval_run(Path(args.run_dir), endpoint=args.endpoint)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from launcher.export.run import export_run, source_model
    from launcher.rundir import RunDir

    rows = args.calibration_rows
    source_model(Path(args.run_dir), args.format, rows)  # exit 2 before taking the lock
    with RunDir(args.run_dir).lock("tune-launch export"):
        out = export_run(Path(args.run_dir), args.format, calibration_rows=rows)
    print(f"exported {args.format}: {out} (validation: {out / 'validation.json'})")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from cluster import jobs

    run_dir = Path(args.run_dir)
    if args.command == "status":
        from launcher.workflow import stages, sweep

        if sweep.is_sweep(run_dir):
            return sweep.print_status(run_dir)
        if stages.is_workflow_dir(run_dir):
            return stages.print_status(run_dir)
        return jobs.print_status(run_dir, as_json=args.json)
    if args.command == "cancel":
        return jobs.cancel(run_dir)
    return jobs.print_logs(run_dir, rank=args.rank, follow=args.follow, stage=args.stage)


HANDLERS = {
    "run": cmd_run,
    "plan": cmd_plan,
    "tiny": cmd_tiny,
    "merge": cmd_merge,
    "serve": cmd_serve,
    "eval": cmd_eval,
    "export": cmd_export,
    "status": cmd_jobs,
    "logs": cmd_jobs,
    "cancel": cmd_jobs,
    "sweep": cmd_sweep,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "run")  # tune-launch RECIPE ... == tune-launch run RECIPE ...
    try:
        args = build_parser().parse_args(argv)
        code = HANDLERS[args.command](args)
    except RecipeError as exc:
        print(f"error: {exc.render()}", file=sys.stderr)
        return 2
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
