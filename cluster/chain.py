"""The run as a chain of SLURM jobs: NAME-train, then NAME-merge and NAME-eval, each queued at
once with `--dependency=afterok:<previous>` and `--kill-on-invalid-dep=yes`, so that SLURM
itself cancels what follows a stage that fails. A requeue of the training job (preemption,
the time limit) keeps its id: the chain keeps waiting.

RUN_DIR/job.json (cluster.base.JobRecord) names the training job (`job_id`) and every job of
the chain (`extra["chain"]`: stage, job id, tasks); RUN_DIR/endpoint.json the standing
endpoint of `tune-launch serve --backend slurm` (cluster/endpoint.py).

What SLURM says of a job comes from sacct (accounting) and, for live jobs, squeue; when
accounting cannot be reached (slurmdbd down) this is said, and squeue / `scontrol show job`
(jobs that ended in the last MinJobAge seconds) and the run directory (submitit's result of
each job) stand in. A job that can never start (NEVER_START reasons) is cancelled with the
rest of the chain, and the error names SLURM's reason and the request.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cluster.base import JobRecord
from launcher.errors import Problem, RecipeError, RunError
from launcher.rundir import RunDir

# pending reasons that mean the request exceeds what any node or partition offers
NEVER_START = {
    "PartitionConfig": "the request exceeds what the partition's nodes offer (CPUs, memory, "
    "GPUs per node)",
    "PartitionNodeLimit": "more nodes than the partition allows or has",
    "PartitionTimeLimit": "a time limit above the partition's MaxTime",
    "BadConstraints": "no node has the requested features",
    "InvalidAccount": "the account is not valid",
    "InvalidQOS": "the QOS is not valid",
    "ReqNodeNotAvail": "the nodes the job needs are not available, and no node of the "
    "partition is up",
}
LIVE = ("PENDING", "RUNNING")
ENDED_STATES = ("COMPLETED", "FAILED", "CANCELLED")


@dataclass
class StageState:
    """One job of the run, as status shows it."""

    stage: str
    job_id: str
    state: str = "UNKNOWN"  # PENDING RUNNING COMPLETED FAILED CANCELLED PREEMPTED UNKNOWN
    slurm_state: str = ""
    reason: str = ""
    node: str = ""
    elapsed: str = ""
    exit_code: str = ""
    requeues: int = 0
    source: str = ""  # sacct | squeue | scontrol | run dir
    error: str | None = None
    detail: str = ""  # progress, endpoint URL, eval headline

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ChainView:
    stages: list[StageState]
    accounting_error: str | None = None
    never: dict[str, str] = field(default_factory=dict)  # job id -> reason


# --------------------------------------------------------------------------------------------
# Asking SLURM


def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None


def _first_error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def query_jobs(job_ids: list[str]) -> tuple[dict[str, StageState], str | None]:
    """job id -> what SLURM says, and why accounting could not be asked (None when it could)."""
    found: dict[str, StageState] = {}
    acct_error = None
    fields = ["JobID", "State", "ExitCode", "NodeList", "Elapsed", "Reason"]
    cmd = ["sacct", "-D", "-X", "-n", "-P", "-j", ",".join(job_ids), "-o", ",".join(fields)]
    out = _run(cmd)
    if out is None or out.returncode != 0:
        why = _first_error_line(out.stderr) if out is not None else "sacct did not run"
        acct_error = f"SLURM accounting (sacct) cannot be reached: {why}"
    else:
        for line in out.stdout.splitlines():
            row = dict(zip(fields, line.split("|"), strict=False))
            job = row.get("JobID", "")
            if job not in job_ids:
                continue
            seen = found.get(job)
            requeues = (seen.requeues if seen else 0) + ("REQUEUED" in row["State"])
            found[job] = StageState(
                stage="",
                job_id=job,
                slurm_state=row["State"],
                reason=row.get("Reason", ""),
                node=row.get("NodeList", ""),
                elapsed=row.get("Elapsed", ""),
                exit_code=row.get("ExitCode", ""),
                requeues=requeues,
                source="sacct",
            )
    live = _run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i|%T|%r|%N|%M"])
    for line in (live.stdout if live is not None else "").splitlines():
        job, state, reason, nodes, elapsed = (line.split("|") + [""] * 5)[:5]
        info = found.setdefault(job, StageState(stage="", job_id=job))
        info.slurm_state, info.reason, info.source = state, reason, "squeue"
        info.node, info.elapsed = nodes or info.node, elapsed or info.elapsed
    for job in job_ids:
        if job not in found and acct_error:
            info_or_none = _scontrol(job)
            if info_or_none:
                found[job] = info_or_none
    for info in found.values():
        info.state = slurm_word(info.slurm_state)
    return found, acct_error


def _scontrol(job: str) -> StageState | None:
    """A job that ended in the last MinJobAge seconds, from the controller's memory."""
    out = _run(["scontrol", "-o", "show", "job", job])
    if out is None or out.returncode != 0:
        return None
    values = dict(re.findall(r"(\w+)=(\S*)", out.stdout))
    return StageState(
        stage="",
        job_id=job,
        slurm_state=values.get("JobState", ""),
        reason=values.get("Reason", ""),
        node=values.get("NodeList", ""),
        elapsed=values.get("RunTime", ""),
        exit_code=values.get("ExitCode", ""),
        requeues=int(values.get("Restarts", "0") or 0),
        source="scontrol",
    )


_WORDS = {
    "PENDING": "PENDING",
    "REQUEUED": "PENDING",
    "REQUEUE_HOLD": "PENDING",
    "REQUEUE_FED": "PENDING",
    "CONFIGURING": "PENDING",
    "RUNNING": "RUNNING",
    "COMPLETING": "RUNNING",
    "SUSPENDED": "RUNNING",
    "RESIZING": "RUNNING",
    "COMPLETED": "COMPLETED",
    "CANCELLED": "CANCELLED",
    "PREEMPTED": "PREEMPTED",
    "FAILED": "FAILED",
    "TIMEOUT": "FAILED",
    "NODE_FAIL": "FAILED",
    "OUT_OF_MEMORY": "FAILED",
    "BOOT_FAIL": "FAILED",
    "DEADLINE": "FAILED",
}


def slurm_word(raw: str) -> str:
    """Our state for SLURM's ("CANCELLED by 0" -> CANCELLED)."""
    word = raw.split()[0] if raw.strip() else ""
    return _WORDS.get(word, "UNKNOWN")


def never_starts(info: StageState, partition: str | None = None) -> str | None:
    """SLURM's reason when a pending job can never start, else None."""
    if info.state != "PENDING":
        return None
    reason = info.reason.split(",")[0].strip()
    if reason not in NEVER_START:
        return None
    if reason == "ReqNodeNotAvail" and _partition_has_usable_node(partition):
        return None  # nodes are down or drained for now: it may still start
    return reason


def _partition_has_usable_node(partition: str | None) -> bool:
    cmd = ["sinfo", "-h", "-N", "-o", "%t", "-t", "idle,mix,alloc,comp"]
    if partition:
        cmd += ["-p", partition]
    out = _run(cmd)
    return out is None or bool(out.stdout.strip())


def partition_offers(partition: str | None) -> str:
    """What the partition's nodes offer: CPUs, memory, GPUs per node, node count, time limit."""
    cmd = ["sinfo", "-h", "-o", "%P %D %c %m %G %l"]
    if partition:
        cmd += ["-p", partition]
    out = _run(cmd)
    rows = []
    for line in (out.stdout if out is not None else "").splitlines():
        parts = line.split()
        if len(parts) == 6:
            name, nodes, cpus, mem, gres, limit = parts
            gpus = "" if gres in ("(null)", "") else f", {gres}"
            rows.append(
                f"partition {name}: {nodes} node(s) of {cpus} CPUs, {mem} MB{gpus}, time limit {limit}"
            )
    return "; ".join(rows) or "sinfo did not answer"


def describe_request(parameters: dict[str, Any]) -> str:
    """The sizes of a job's request, as sbatch flags."""
    keys = ("partition", "nodes", "ntasks_per_node", "cpus_per_task", "mem", "gres", "time")
    shown = [
        f"--{k.replace('_', '-')}={parameters[k]}" for k in keys if parameters.get(k) is not None
    ]
    return " ".join(shown)


# --------------------------------------------------------------------------------------------
# Before submitting: sbatch --test-only


def test_only(stage: str, script: str, parameters: dict[str, Any]) -> None:
    """RecipeError (exit 2) when SLURM says no node or partition can ever run this job."""
    with tempfile.NamedTemporaryFile("w", suffix=".sbatch", delete=False) as fh:
        fh.write(
            re.sub(r"^#SBATCH --(dependency|kill-on-invalid-dep)=.*\n", "", script, flags=re.M)
        )
        path = fh.name
    try:
        out = _run(["sbatch", "--test-only", path])
    finally:
        Path(path).unlink(missing_ok=True)
    if out is None or out.returncode == 0:
        return
    from cluster.stages import stage_fields

    said = " / ".join(
        line.removeprefix("sbatch: error: ").strip()
        for line in out.stderr.splitlines()
        if line.strip()
    )
    raise RecipeError(
        [
            Problem(
                stage_fields(stage),
                f"SLURM refuses the {stage} job (sbatch --test-only): {said}; the request: "
                f"{describe_request(parameters)}; {partition_offers(parameters.get('partition'))}",
                "size the request to what the partition's nodes offer (nothing was queued)",
            )
        ],
        "resources",
    )


# --------------------------------------------------------------------------------------------
# Following the chain


def chain_of(record: JobRecord) -> list[dict[str, Any]]:
    """The chain's jobs, in order: [{"stage", "job_id", "tasks"}] (a record from before the
    chain holds the training job only)."""
    chain = record.extra.get("chain")
    if chain:
        return list(chain)
    return [{"stage": "train", "job_id": record.job_id, "tasks": record.extra.get("tasks", 1)}]


def job_tasks(run: RunDir, job_id: str, count: int) -> list[Any]:
    """submitit's paths (JobPaths: stdout, stderr, result_pickle) of each task of a job."""
    from submitit.core.utils import JobPaths

    return [JobPaths(run.slurm, job_id=job_id, task_id=task) for task in range(count)]


def task_result(task: Any) -> tuple[Any, Any] | None:
    """submitit's (outcome, value) of one task: the result pickle its own job wrote into
    RUN_DIR/slurm (the one unpickling here); None while there is none or it is half-written."""
    from submitit.core.utils import pickle_load

    try:
        found = pickle_load(task.result_pickle)
    except Exception:
        return None
    return tuple(found) if isinstance(found, tuple | list) and len(found) == 2 else None


def outcome(run: RunDir, job_id: str, tasks: int) -> str | None:
    """What submitit recorded of the job's tasks: "success", "error" or None."""
    found = None
    for task in job_tasks(run, job_id, tasks):
        recorded = task_result(task)
        if recorded is None:
            continue
        result = recorded[0]
        if result == "error":
            return "error"
        found = found or result
    return found


def job_error(run: RunDir, job_id: str, tasks: int, raw: str) -> str:
    """Why a job ended: the node tasks' own reports, else submitit's traceback's first real
    exception, else SLURM's state, else the last line a task wrote to stderr."""
    import json

    from cluster.diagnose import error_summary

    errors = run.node_errors(job_id)
    if errors:
        messages = [json.loads(p.read_text())["message"] for p in errors]
        return "; ".join(dict.fromkeys(messages))
    paths = job_tasks(run, job_id, tasks)
    for task in paths:
        recorded = task_result(task)
        if recorded is None:
            continue
        result, trace = recorded
        if result == "error":
            return error_summary(str(trace)).removeprefix("launcher.errors.RunError: ")
    if raw.startswith("CANCELLED"):
        return raw.lower()
    for task in paths:
        if task.stderr.exists():
            summary = error_summary(task.stderr.read_text(errors="replace"))
            if summary != "no error output":
                return summary
    return raw or "unknown"


def view(run_dir: Path, record: JobRecord) -> ChainView:
    """Every job of the run, as SLURM (or, without accounting, the run directory) says."""
    run = RunDir(run_dir)
    chain = chain_of(record)
    ids = [str(job["job_id"]) for job in chain]
    infos, acct_error = query_jobs(ids)
    partition = record.extra.get("partition")
    result = ChainView([], acct_error)
    for job in chain:
        job_id, tasks = str(job["job_id"]), int(job.get("tasks", 1))
        info = infos.get(job_id) or StageState(stage="", job_id=job_id, source="run dir")
        info.stage = job["stage"]
        if info.state == "UNKNOWN":  # SLURM no longer knows it: the run directory does
            done = outcome(run, job_id, tasks)
            info.state = {"success": "COMPLETED", "error": "FAILED"}.get(done or "", "UNKNOWN")
            info.source = "run dir" if done else info.source
        if info.state in ("FAILED", "CANCELLED", "PREEMPTED"):
            info.error = job_error(run, job_id, tasks, info.slurm_state)
            if info.reason == "Dependency" and info.state == "CANCELLED":
                info.error = "cancelled by SLURM: the stage before it did not complete"
            elif info.state == "CANCELLED" and info.error.startswith("cancelled by"):
                info.error = "cancelled (scancel or tune-launch cancel)"
        if info.node in ("None assigned", "(null)"):
            info.node = ""
        reason = never_starts(info, partition)
        if reason or job_id in record.extra.get("never", {}):
            result.never[job_id] = reason or "never"
        result.stages.append(info)
    return result


def overall(chain: ChainView) -> tuple[str, str | None]:
    """The run's state and its error: the first stage that failed (or can never start)
    decides; else RUNNING while any job runs, COMPLETED when all completed."""
    for info in chain.stages:
        if info.job_id in chain.never:
            return "FAILED", never_message(info, chain.never[info.job_id])
        if info.state in ("FAILED", "CANCELLED"):
            return info.state, f"stage {info.stage} {info.state.lower()}: {info.error}"
        if info.state == "PREEMPTED":  # requeued (then PENDING in squeue) or gone
            return "PREEMPTED", f"stage {info.stage} preempted: {info.error}"
    states = [info.state for info in chain.stages]
    if all(state == "COMPLETED" for state in states):
        return "COMPLETED", None
    if "UNKNOWN" in states and not any(s in LIVE for s in states):
        return "UNKNOWN", chain.accounting_error
    return ("RUNNING" if "RUNNING" in states else "PENDING"), None


def never_message(info: StageState, reason: str) -> str:
    if reason not in NEVER_START:
        return f"SLURM can never start the {info.stage} job {info.job_id}"
    return (
        f"SLURM can never start the {info.stage} job {info.job_id}: {reason} "
        f"({NEVER_START[reason]})"
    )


def cancel_jobs(job_ids: list[str]) -> None:
    if job_ids:
        subprocess.run(["scancel", *job_ids], check=False, timeout=30, capture_output=True)


def settle(run_dir: Path, record: JobRecord, chain: ChainView) -> None:
    """After a stage failed or can never start: cancel what is left of the chain (SLURM
    cancels the dependants of a failed job itself; this also covers a job that never starts
    and a controller that has not acted yet)."""
    first = next(
        (i for i, s in enumerate(chain.stages) if s.state == "FAILED" or s.job_id in chain.never),
        None,
    )
    if first is None:
        return
    failed = chain.stages[first]
    doomed = [s for s in chain.stages[first + 1 :] if s.state in LIVE]
    if failed.job_id in chain.never and failed.state in LIVE:
        doomed.insert(0, failed)
    cancel_jobs([s.job_id for s in doomed])
    for stage in doomed:
        if stage is not failed:
            stage.state = "CANCELLED"
            stage.error = f"cancelled: stage {failed.stage} did not complete"
    if failed.job_id in chain.never:
        never = record.extra.setdefault("never", {})
        if failed.job_id not in never:
            asked = describe_request(record.extra.get("requests", {}).get(failed.stage, {}))
            offers = partition_offers(record.extra.get("partition"))
            never[failed.job_id] = (
                f"{never_message(failed, chain.never[failed.job_id])}; the request: {asked}; "
                f"{offers}; the job was cancelled"
            )
            record.save(run_dir)
        failed.state, failed.error = "FAILED", never[failed.job_id]


def record_state(run_dir: Path, record: JobRecord) -> JobRecord:
    """The record with the chain's state, error and stages (in extra["stages"])."""
    chain = view(run_dir, record)
    settle(run_dir, record, chain)
    state, error = overall(chain)
    if chain.never:  # settle() spelt the request out
        error = next(i.error for i in chain.stages if i.job_id in chain.never)
    record.state, record.error = state, error
    train = chain.stages[0]
    record.extra["slurm_state"] = train.slurm_state
    record.extra["requeues"] = train.requeues
    record.extra["nodes"] = train.node
    record.extra["exit_code"] = train.exit_code
    record.extra["stages"] = [info.as_dict() for info in chain.stages]
    record.extra["accounting_error"] = chain.accounting_error
    if state in ENDED_STATES and error is None:
        record.error = None
    return record


def require_record(run_dir: Path) -> JobRecord:
    record = JobRecord.load(run_dir)
    if record is None or record.backend != "slurm":
        raise RunError(f"no SLURM job recorded in {RunDir(run_dir).job_file}")
    return record
