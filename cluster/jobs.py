"""`tune-launch status | cancel | logs RUN_DIR`: from the run directory alone.

RUN_DIR/job.json names the backend that ran the job (cluster.base.JobRecord); each command
asks that backend (cluster/local.py: recorded process group; cluster/slurm.py: the chain of
jobs through cluster/chain.py, sacct/squeue/scontrol, scancel, submitit's files). On SLURM,
status shows every stage (train, merge, eval, and a standing endpoint: serve) with its job,
node, elapsed time and what it has to show (last step and loss, the URL, the eval headline).
Exit codes: 0 ok (status: completed or still going), 1 failed / cancelled / cannot be found.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from cluster.base import Backend, JobRecord, backend_named
from launcher.errors import Problem, RecipeError, RunError
from launcher.rundir import RunDir

LOG_STAGES = ("train", "merge", "eval", "serve")


def _backend(run_dir: Path) -> tuple[Backend[Any], JobRecord]:
    record = JobRecord.load(run_dir)
    if record is None:
        raise RunError(
            f"no job recorded in {run_dir} (no job.json): was it started with "
            f"`tune-launch RECIPE --run-dir {run_dir}`?"
        )
    return backend_named(record.backend), record


def _train_detail(run: RunDir) -> str:
    rows = [r for r in run.metrics() if r.get("loss") is not None]
    if not rows:
        step = run.last_step()
        return f"last logged step {step}" if step is not None else ""
    last = rows[-1]
    total = f"/{last['total_steps']}" if last.get("total_steps") else ""
    return f"step {last.get('step')}{total}, loss {float(last['loss']):.4f}"


def _eval_detail(run: RunDir) -> str:
    from cluster.slurm import eval_lines

    lines = eval_lines(run)
    return "; ".join(lines[:-1]) if lines else ""


def stage_rows(run_dir: Path, record: JobRecord) -> list[dict[str, Any]]:
    """Every stage of the run with what it has to show (SLURM records)."""
    from cluster import chain, endpoint

    run = RunDir(run_dir)
    rows = [dict(stage) for stage in record.extra.get("stages", [])]
    for row in rows:
        if row["stage"] == "train":
            row["detail"] = _train_detail(run)
        elif row["stage"] == "eval" and row["state"] == "COMPLETED":
            row["detail"] = _eval_detail(run)
        elif row["stage"] == "merge" and row["state"] == "COMPLETED":
            row["detail"] = str(run.merged)
    served = endpoint.read(run.path)
    if served and served.get("job_id"):
        infos, _ = chain.query_jobs([str(served["job_id"])])
        info = infos.get(str(served["job_id"])) or chain.StageState("", str(served["job_id"]))
        info.stage = "serve"
        if info.state == "UNKNOWN":
            info.state = "ENDED"
        info.detail = served.get("url", "starting") if info.state == "RUNNING" else ""
        rows.append(info.as_dict())
    return rows


def print_status(run_dir: Path, as_json: bool = False) -> int:
    """One line of state, then every stage (SLURM) or what is known (local)."""
    run_dir = Path(run_dir)
    backend, _ = _backend(run_dir)
    record = backend.status(run_dir)
    failed = record.state in ("FAILED", "CANCELLED", "PREEMPTED", "UNKNOWN")
    rows = stage_rows(run_dir, record) if record.backend == "slurm" else []
    if as_json:
        out = {
            "run_dir": str(run_dir),
            "state": record.state,
            "backend": record.backend,
            "job_id": record.job_id,
            "error": record.error,
            "accounting_error": record.extra.get("accounting_error"),
            "stages": rows,
            "last_step": RunDir(run_dir).last_step(),
        }
        print(json.dumps(out, indent=2))
        return 1 if failed else 0
    print(f"{run_dir}: {record.state} ({record.backend} job {record.job_id})")
    if record.backend == "slurm":
        _print_stages(rows, record)
    else:
        step = RunDir(run_dir).last_step()
        if step is not None:
            print(f"  last logged step: {step}")
    run = RunDir(run_dir)
    if run.final.is_dir():
        print(f"  final model: {run.final}")
    if record.error:
        print(f"  error: {record.error}")
    if failed:
        print(f"  logs: tune-launch logs {run_dir} [--stage train|merge|eval] [--rank N]")
        return 1
    return 0


def _print_stages(rows: list[dict[str, Any]], record: JobRecord) -> None:
    extra = record.extra
    if extra.get("accounting_error"):
        print(
            f"  note: {extra['accounting_error']}; states below come from squeue / scontrol "
            "and the run directory"
        )
    header = ("stage", "state", "job", "node", "elapsed", "")
    table = [header]
    for row in rows:
        state = row["state"]
        if state == "PENDING" and row.get("reason") not in (None, "", "None"):
            state += f" ({row['reason']})"
        if row.get("requeues"):
            state += f", requeued {row['requeues']}x"
        table.append(
            (
                row["stage"],
                state,
                row["job_id"],
                row.get("node") or "-",
                row.get("elapsed") or "-",
                row.get("detail") or "",
            )
        )
    widths = [max(len(str(r[i])) for r in table) for i in range(5)]
    for r in table:
        cells = [str(r[i]).ljust(widths[i]) for i in range(5)]
        print("  " + "  ".join(cells) + ("  " + r[5] if r[5] else ""))
    if extra.get("requeues"):
        print(f"  training requeued {extra['requeues']}x (preemption/time limit)")


def cancel(run_dir: Path) -> int:
    run_dir = Path(run_dir)
    backend, record = _backend(run_dir)
    backend.cancel(run_dir)
    if record.backend == "local":
        print(f"cancelled local job {record.job_id} in {run_dir}")
    return 0


def print_logs(
    run_dir: Path, rank: int | None = None, follow: bool = False, stage: str | None = None
) -> int:
    """A rank's log (--rank; default rank 0), a stage's job output (--stage), or, following a
    SLURM run with neither, what `--wait` shows: stage transitions and progress lines."""
    run_dir = Path(run_dir)
    backend, record = _backend(run_dir)
    if stage is not None and stage not in LOG_STAGES:
        raise RecipeError(
            [Problem("--stage", "unknown stage", f"use {'|'.join(LOG_STAGES)}", stage)], "usage"
        )
    if record.backend == "slurm" and (
        stage not in (None, "train") or (follow and rank is None and stage is None)
    ):
        lines = _slurm_lines(run_dir, record, stage, follow)
    elif stage in ("merge", "eval", "serve"):  # local: the stage's own log files
        from cluster.slurm import read_files

        run = RunDir(run_dir)
        lines = read_files(
            [run.merge_log] if stage == "merge" else sorted(run.logs.glob("server*.log"))
        )
    else:
        lines = backend.logs(run_dir, rank or 0, follow)
    shown = False
    try:
        for line in lines:
            shown = True
            print(line.rstrip("\n"), flush=True)
    except KeyboardInterrupt:
        return 0
    if not shown:
        what = f"stage {stage}" if stage else f"rank {rank or 0}"
        print(f"no log yet for {what} in {RunDir(run_dir).logs}", file=sys.stderr)
    return 0


def _slurm_lines(run_dir: Path, record: JobRecord, stage: str | None, follow: bool) -> Any:
    import time

    from cluster import chain, endpoint
    from cluster.slurm import SlurmBackend, Watcher, follow_file, read_files

    backend = SlurmBackend()
    run = RunDir(run_dir)
    if stage is None:  # the progress view, until the chain ends

        def watch() -> Any:
            watcher = Watcher(run)
            while True:
                now = backend.status(run_dir)
                yield from watcher.lines(now)
                if now.state not in chain.LIVE:
                    return
                time.sleep(2.0)

        return watch()
    if stage == "serve":
        served = endpoint.read(run.path) or {}
        job_id, extra = str(served.get("job_id", "")), [run.named_server_log("endpoint")]
    else:
        job = next((j for j in chain.chain_of(record) if j["stage"] == stage), None)
        if job is None:
            raise RunError(f"no {stage} job in {run_dir}'s chain (job.json)")
        job_id = str(job["job_id"])
        extra = [run.merge_log] if stage == "merge" else sorted(run.logs.glob("server-eval*.log"))
    paths = chain.job_tasks(run, job_id, 1)[0] if job_id else None
    files = ([paths.stdout, paths.stderr] if paths else []) + extra
    if not follow or paths is None:
        return read_files(files)

    def ended() -> bool:
        infos, _ = chain.query_jobs([job_id])
        info = infos.get(job_id)
        return info is None or info.state not in chain.LIVE

    return follow_file(paths.stdout, ended)
