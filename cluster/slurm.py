"""SLURM through submitit: one task per node runs that node's launcher (cluster/node_entry.py).

The sbatch parameters come from the plan alone (`sbatch_parameters`); the dry run renders
them with submitit's own renderer, so what it prints is the script submitit writes. Jobs are
followed from the run directory: RUN_DIR/job.json names the job, RUN_DIR/slurm/ holds
submitit's script, pickles and per-task stdout/stderr, and `sacct` says the state.

Environment: sbatch exports the submitting shell's environment to the job (SLURM's default,
--export=ALL), so secrets (recipe.secrets) reach the ranks without ever being written to a
script; plan.env is added per node by the node task.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cluster.base import JobRecord
from cluster.node_entry import NodeTask
from launcher.config.plan import Plan
from launcher.errors import RunError

FOLDER = "slurm"  # submitit's folder inside the run directory
SACCT_TO_STATE = {
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
# srun: when one node's task fails, stop the others instead of letting them hang in a
# collective until the NCCL/gloo timeout
SRUN_ARGS = ["--kill-on-bad-exit=1"]


def time_minutes(text: str) -> int:
    """SLURM's time formats ([D-]HH:MM:SS or minutes) as whole minutes, rounded up."""
    if re.fullmatch(r"\d+", text):
        return int(text)
    days, _, hms = text.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return (int(days or 0) * 24 + h) * 60 + m + math.ceil(s / 60)


def sbatch_parameters(plan: Plan) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters for the plan (its names; rendered as #SBATCH)."""
    res = plan.recipe.resources
    params: dict[str, Any] = {
        "job_name": plan.name,
        "nodes": plan.nodes,
        "ntasks_per_node": 1,  # one node task starts the node's gpus_per_node processes
        # at least one CPU per training process unless the recipe says how many
        "cpus_per_task": res.cpus_per_node or plan.gpus_per_node,
        "time": time_minutes(res.time),
        "signal_delay_s": res.signal_lead_s,
        "srun_args": list(SRUN_ARGS),
    }
    if res.mem_per_node_gib:
        params["mem"] = f"{res.mem_per_node_gib}G"
    if plan.on_gpu:  # CPU clusters: gpus_per_node is the number of gloo processes, no GPU asked
        kind = f"{res.gpu_type}:" if res.gpu_type else ""
        params["gres"] = f"gpu:{kind}{plan.gpus_per_node}"
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(res, key)
        if value:
            params[key] = value
    if res.exclusive:
        params["exclusive"] = True
    extra = {k: v for k, v in res.sbatch_extra.items() if v is not False}
    if extra:
        params["additional_parameters"] = extra
    return params


def python_of(plan: Plan) -> str:
    """The interpreter the job runs (the plan's, so the job sees the same environment)."""
    return shlex.quote(plan.launch[0])


def submit_command(plan: Plan) -> str:
    """The command submitit puts in the script (SlurmExecutor._submitit_command_str)."""
    folder = Path(plan.run_dir) / FOLDER
    return " ".join([python_of(plan), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def sbatch_script(plan: Plan) -> str:
    """The sbatch script, rendered by submitit (SlurmExecutor._make_submission_file_text)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = Path(plan.run_dir) / FOLDER
    return _make_sbatch_string(
        command=submit_command(plan), folder=folder, **sbatch_parameters(plan)
    )


def save_timeout_s(plan: Plan) -> float:
    """How long, after the save signal, task 0 waits for the ranks' checkpoint."""
    return float(max(5, plan.recipe.resources.signal_lead_s - 15))


def node_task(plan: Plan) -> NodeTask:
    return NodeTask(
        plan.run_dir,
        max_requeues=plan.recipe.resources.max_requeues,
        save_timeout_s=save_timeout_s(plan),
    )


def node_command_text(plan: Plan) -> str:
    """What each task does, for the dry run."""
    r = plan.recipe.resources
    lines = [
        f"# {plan.nodes} task(s), one per node; each runs cluster.node_entry.NodeTask("
        f"{plan.run_dir!r}, max_requeues={r.max_requeues}, save_timeout_s={save_timeout_s(plan):.0f})",
        "# which fills the placeholders inside the step and runs, with os.environ + plan.env",
        "# + TUNE_LAUNCH_SAVE_SIGNAL=SIGUSR2 (the launcher itself ignores SIGUSR2):",
        shlex.join(plan.launch),
        "#   {node_rank}   = $SLURM_NODEID (read in the step)",
        "#   {master_addr} = NodeAddr of the first node of $SLURM_JOB_NODELIST (scontrol show node)",
        "#   {master_port} = 20000 + 10 * (job id mod 1000) + ($SLURM_RESTART_COUNT mod 10)",
        "#   {rdzv_id}     = <job id>-<restart count>",
    ]
    if plan.secrets:
        lines.append(
            "# secrets from the submitting shell (sbatch exports its environment): "
            + " ".join(plan.secrets)
        )
    return "\n".join(lines)


def _sacct(job_id: str, *fields: str, duplicates: bool = False) -> list[dict[str, str]]:
    cmd = ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", ",".join(fields)]
    if duplicates:
        cmd.insert(1, "-D")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [dict(zip(fields, line.split("|"), strict=False)) for line in out.splitlines() if line]


def _squeue_state(job_id: str) -> str | None:
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None


class SlurmBackend:
    """The Backend protocol on SLURM, through submitit."""

    name = "slurm"

    def dryrun(self, plan: Plan) -> dict[str, str]:
        folder = Path(plan.run_dir) / FOLDER
        return {
            f"sbatch script (submitit writes it as {folder}/<job id>_submission.sh)": sbatch_script(
                plan
            ),
            "submission": f"sbatch {folder}/.submission_file_<uuid>.sh",
            "each task (srun, one per node)": node_command_text(plan),
        }

    def submit(self, plan: Plan, *, wait: bool) -> int:
        import submitit

        run = Path(plan.run_dir)
        executor = submitit.SlurmExecutor(
            folder=run / FOLDER,
            max_num_timeout=plan.recipe.resources.max_requeues,
            python=python_of(plan),
        )
        executor.update_parameters(**sbatch_parameters(plan))
        try:
            job = executor.submit(node_task(plan))
        except submitit.core.utils.FailedJobError as exc:  # sbatch refused the script
            raise RunError(
                f"sbatch refused the job: {str(exc).strip()}\n  fix resources.* in the recipe; "
                "`--dry-run` prints the script"
            ) from None
        record = JobRecord(
            backend="slurm",
            job_id=str(job.job_id),
            state="PENDING",
            extra={
                "folder": str(run / FOLDER),
                "tasks": plan.nodes,
                "submitted": time.time(),
                "submission_file": str(job.paths.submission_file),
            },
        )
        record.save(run)
        print(f"submitted SLURM job {job.job_id} ({plan.nodes} node(s)) for {run}")
        print(f"  follow it: tune-launch status {run}  |  tune-launch logs {run} --follow")
        print(f"  stop it:   tune-launch cancel {run}")
        if not wait:
            return 0
        return self.wait(run)

    # --- following a job from its run directory
    def status(self, run_dir: Path) -> JobRecord:
        record = JobRecord.load(run_dir)
        if record is None or record.backend != "slurm":
            raise RunError(f"no SLURM job recorded in {run_dir}/job.json")
        attempts = _sacct(record.job_id, "State", "ExitCode", "NodeList", duplicates=True)
        raw = attempts[-1]["State"] if attempts else (_squeue_state(record.job_id) or "UNKNOWN")
        word = raw.split()[0] if raw else "UNKNOWN"
        state = SACCT_TO_STATE.get(word, "UNKNOWN")
        record.state = state
        record.extra["slurm_state"] = raw
        record.extra["requeues"] = sum(1 for a in attempts if a["State"].startswith("REQUEUED"))
        if attempts:
            record.extra["nodes"] = attempts[-1].get("NodeList", "")
            record.extra["exit_code"] = attempts[-1].get("ExitCode", "")
        if state in ("FAILED", "CANCELLED", "PREEMPTED"):
            record.error = self._error(run_dir, record, raw)
        return record

    def _error(self, run_dir: Path, record: JobRecord, raw: str) -> str | None:
        folder = Path(record.extra.get("folder", run_dir / FOLDER))
        errors = sorted(folder.glob(f"{record.job_id}_*_error.json"))
        if errors:
            messages = [json.loads(p.read_text())["message"] for p in errors]
            return "; ".join(dict.fromkeys(messages))  # each task reports; say each thing once
        from submitit.core.utils import pickle_load

        for pkl in sorted(folder.glob(f"{record.job_id}_*_result.pkl")):
            try:
                outcome, trace = pickle_load(pkl)
            except Exception:  # a half-written pickle: ignore
                continue
            if outcome == "error":
                lines = [line for line in str(trace).splitlines() if line.strip()]
                return lines[-1] if lines else "failed"
        if raw.startswith("CANCELLED"):
            return raw.lower()
        for err in sorted(folder.glob(f"{record.job_id}_*_log.err")):
            lines = [line for line in err.read_text(errors="replace").splitlines() if line.strip()]
            if lines:
                return lines[-1]
        return raw

    def cancel(self, run_dir: Path) -> None:
        record = self.status(run_dir)
        if record.state in ("COMPLETED", "FAILED", "CANCELLED"):
            print(f"job {record.job_id} already ended: {record.state}")
            return
        subprocess.run(["scancel", record.job_id], check=True, timeout=30)
        print(f"cancelled SLURM job {record.job_id}")

    def logs(self, run_dir: Path, rank: int, follow: bool) -> Iterator[str]:
        """The rank's log, then submitit's per-task stdout/stderr of the latest job (lines);
        with follow, the rank's log as it grows, until the job ends."""
        record = JobRecord.load(run_dir)
        files = [run_dir / "logs" / f"rank{rank}.log"]
        if record is not None:
            folder = Path(record.extra.get("folder", run_dir / FOLDER))
            for task in range(int(record.extra.get("tasks", 1))):
                files += [
                    folder / f"{record.job_id}_{task}_log.out",
                    folder / f"{record.job_id}_{task}_log.err",
                ]
        if not follow:
            for path in files:
                if path.exists():
                    yield f"==> {path} <=="
                    yield from path.read_text(errors="replace").splitlines()
            return
        yield from _follow(files[0], lambda: self.status(run_dir).state in _ENDED)

    def wait(self, run_dir: Path, poll_s: float = 2.0) -> int:
        """Follow the job to its end, printing state changes and the training's logged steps;
        0 if it completed, else 1."""
        last = None
        progress = _Progress(run_dir / "metrics.jsonl")
        while True:
            record = self.status(run_dir)
            shown = f"{record.state} ({record.extra.get('slurm_state', '')})"
            if shown != last:
                extra = (
                    f", requeued {record.extra['requeues']}x" if record.extra["requeues"] else ""
                )
                print(f"job {record.job_id}: {shown}{extra}", flush=True)
                last = shown
            for line in progress.new_lines():
                print(f"  {line}", flush=True)
            if record.state in _ENDED and self._settled(record):
                record.save(run_dir)
                if record.state == "COMPLETED":
                    return 0
                print(f"job {record.job_id} {record.state}: {record.error}", file=sys.stderr)
                return 1
            time.sleep(poll_s)

    @staticmethod
    def _settled(record: JobRecord) -> bool:
        # a PREEMPTED job that SLURM requeues comes back as PENDING: check it is really gone
        if record.state != "PREEMPTED":
            return True
        return _squeue_state(record.job_id) is None


_ENDED = ("COMPLETED", "FAILED", "CANCELLED", "PREEMPTED")


class _Progress:
    """New training records of metrics.jsonl, as short lines."""

    def __init__(self, path: Path) -> None:
        self.path, self.position = path, 0

    def new_lines(self) -> list[str]:
        if not self.path.exists():
            return []
        if self.path.stat().st_size < self.position:  # rewound on resume: read it again
            self.position = 0
        with self.path.open("r", errors="replace") as f:
            f.seek(self.position)
            text = f.read()
        complete = text[: text.rfind("\n") + 1]
        self.position += len(complete.encode())
        lines = []
        for raw in complete.splitlines():
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            shown = {k: rec[k] for k in ("loss", "eval_loss") if rec.get(k) is not None}
            if shown:
                values = ", ".join(f"{k} {v:.4g}" for k, v in shown.items())
                lines.append(f"step {rec.get('step')}: {values}")
        return lines


def _follow(path: Path, ended: Any, poll_s: float = 1.0) -> Iterator[str]:
    """tail -f, line by line, until `ended()` says the job is over (then the rest)."""
    position, partial, checks = 0, "", 0
    while True:
        finished = checks % 5 == 4 and ended()
        checks += 1
        if path.exists():
            with path.open("r", errors="replace") as f:
                f.seek(position)
                chunk = f.read()
                position = f.tell()
            lines = (partial + chunk).split("\n")
            partial = lines.pop()
            yield from lines
        if finished:
            if partial:
                yield partial
            return
        time.sleep(poll_s)
