"""`tune-launch export RUN_DIR --format FORMAT`: the fine-tuned model in another deployment
format, in RUN_DIR/export/FORMAT/ with validation.json (what a consumer we did not write
answered on the held-out prompts, beside the merged model's own greedy answers).

Built in RUN_DIR/export/.FORMAT.tmp and published by RunDir.publish (COMPLETE, one rename)
only when validation passes; a failed validation leaves the staging directory and its
validation.json for inspection and exits 1. The merged model is only read: it stays the
default deployment artifact. The caller holds the run directory's lock.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher.errors import Problem, RecipeError, RunError
from launcher.rundir import RunDir

FORMATS = ("gguf", "int4")


def _usage(path: str, message: str, fix: str, value: Any) -> RecipeError:
    return RecipeError([Problem(path, message, fix, value)], "usage")


def source_model(
    run_dir: Path, fmt: str, calibration_rows: int | None = None
) -> tuple[RunDir, Path]:
    """The run and its fine-tuned model directory, or exit 2 saying what is missing."""
    if fmt not in FORMATS:
        raise _usage("--format", "unknown export format", f"one of: {', '.join(FORMATS)}", fmt)
    if calibration_rows is not None and (fmt != "int4" or calibration_rows < 1):
        raise _usage(
            "--calibration-rows",
            "calibration applies to --format int4 only, with at least one row",
            "drop it, or give a positive count with --format int4",
            calibration_rows,
        )
    run = RunDir(run_dir)
    if not run.has_plan():
        raise _usage(
            "run_dir",
            "not a run directory (no plan.json)",
            "pass a RUN_DIR that trained",
            str(run_dir),
        )
    from serve.spec import finetuned_model_dir

    model = finetuned_model_dir(run)
    if model is None:
        raise _usage(
            "run_dir",
            f"no complete merged model in {run.merged}",
            f"finish the run, or merge it first: tune-launch merge {run_dir}",
            str(run_dir),
        )
    return run, model


def _exporter(fmt: str, calibration_rows: int | None) -> Callable[..., dict[str, Any]]:
    if fmt == "gguf":
        from launcher.export.gguf import export_gguf

        return lambda run, model, staged, *rest: export_gguf(model, staged, *rest)
    from launcher.export.int4 import CALIBRATION_ROWS, export_int4

    rows = calibration_rows or CALIBRATION_ROWS

    def int4(*args: Any) -> dict[str, Any]:
        return export_int4(*args, calibration_rows=rows)

    return int4


def export_run(run_dir: Path, fmt: str, calibration_rows: int | None = None) -> Path:
    """Export, validate and publish; the published directory."""
    from launcher.export.reference import greedy_transformers, held_out_prompts
    from serve.contract import eos_ids

    run, model = source_model(run_dir, fmt, calibration_rows)
    final, staged = run.export(fmt), run.export_staging(fmt)
    if staged.exists():
        RunDir.remove(staged)
    staged.mkdir(parents=True)
    log = run.logs / f"export-{fmt}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    prompts = held_out_prompts(run, model)
    eos = eos_ids(model)
    reference = greedy_transformers(model, prompts, eos)
    record = _exporter(fmt, calibration_rows)(run, model, staged, prompts, reference, eos, log)
    record = {
        "format": fmt,
        "source": str(model),
        "reference": "transformers greedy decoding of the source model",
        "prompts": len(prompts),
        **record,
        "seconds": round(time.monotonic() - started, 1),
    }
    (staged / "validation.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if not record["ok"]:
        raise RunError(
            f"export {fmt}: {', '.join(record['failed'])} disagreed with the merged model "
            f"beyond tolerance; see {staged / 'validation.json'}"
        )
    RunDir.publish(staged, final, {"format": fmt, "source": str(model)})
    return final
