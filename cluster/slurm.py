"""SLURM through submitit: one task per node runs that node's launcher (cluster/node_entry.py).

`prepare(plan)` -> SlurmRequest: the sbatch parameters (from the plan alone), the script
submitit renders from them (its own renderer: what the dry run prints is the script submitit
writes) and each node's command; `submit(request)` hands exactly those to submitit. Jobs are
followed from the run directory: RUN_DIR/job.json names the job, RUN_DIR/slurm/ holds
submitit's script, pickles and per-task stdout/stderr, and `sacct` says the state.

Environment: sbatch exports the submitting shell's environment to the job (SLURM's default,
--export=ALL), so secrets (recipe.secrets) reach the ranks without ever being written to a
script; plan.env is added per node by the node task.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.base import ENDED, JobRecord, record_request
from cluster.node_entry import NodeTask
from launcher.config.plan import Plan
from launcher.config.recipe import time_minutes
from launcher.errors import RunError
from launcher.rundir import RunDir

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


def save_timeout_s(plan: Plan) -> float:
    """How long, after the save signal, task 0 waits for the ranks' checkpoint."""
    return float(max(5, plan.recipe.resources.signal_lead_s - 15))


@dataclass(frozen=True)
class SlurmRequest:
    """What the SLURM backend submits: submitit's executor with `parameters` (the #SBATCH
    lines of `script`, which submitit renders from them) runs `python` on a NodeTask per node
    that starts `launch` (per-node placeholders unfilled) with `env`."""

    run_dir: str
    python: str
    parameters: dict[str, Any]
    script: str
    launch: tuple[str, ...]
    env: dict[str, str]
    secrets: tuple[str, ...]
    max_requeues: int
    save_timeout_s: float

    @property
    def folder(self) -> Path:
        return RunDir(self.run_dir).slurm

    def executor(self) -> Any:
        """submitit's SlurmExecutor for this request (it renders `script` from `parameters`)."""
        import submitit

        executor = submitit.SlurmExecutor(
            folder=self.folder, max_num_timeout=self.max_requeues, python=shlex.quote(self.python)
        )
        executor.update_parameters(**self.parameters)
        return executor

    def task(self) -> NodeTask:
        return NodeTask(
            self.run_dir,
            launch=list(self.launch),
            env=dict(self.env),
            max_requeues=self.max_requeues,
            save_timeout_s=self.save_timeout_s,
        )

    def render(self) -> str:
        sections = {
            f"sbatch script (submitit writes it as {self.folder}/<job id>_submission.sh)": (
                self.script.rstrip()
            ),
            "submission": f"sbatch {self.folder}/.submission_file_<uuid>.sh  (through "
            f"submitit; requeued at most {self.max_requeues} times on preemption or the time "
            "limit)",
            "each task (srun, one per node)": self._node_command(),
        }
        return "\n\n".join(f"--- {title}\n{body}" for title, body in sections.items())

    def _node_command(self) -> str:
        lines = [
            f"# {self.parameters['nodes']} task(s), one per node; each runs cluster.node_entry."
            f"NodeTask({self.run_dir!r}, max_requeues={self.max_requeues}, "
            f"save_timeout_s={self.save_timeout_s:.0f})",
            "# which fills the placeholders inside the step and runs, with os.environ + the",
            "# variables below + TUNE_LAUNCH_SAVE_SIGNAL=SIGUSR2 (the launcher ignores SIGUSR2):",
            *(f"#   {k}={shlex.quote(v)}" for k, v in sorted(self.env.items())),
            shlex.join(self.launch),
            "#   {node_rank}   = $SLURM_NODEID (read in the step)",
            "#   {master_addr} = NodeAddr of the first node of $SLURM_JOB_NODELIST (scontrol show node)",
            "#   {master_port} = 20000 + 10 * (job id mod 1000) + ($SLURM_RESTART_COUNT mod 10)",
            "#   {rdzv_id}     = <job id>-<restart count>",
        ]
        if self.secrets:
            lines.append(
                "# secrets from the submitting shell (sbatch exports its environment): "
                + " ".join(self.secrets)
            )
        return "\n".join(lines)


def sbatch_script(parameters: dict[str, Any], run_dir: str, python: str) -> str:
    """The sbatch script, rendered by submitit (SlurmExecutor._make_submission_file_text)
    around the command it puts in it (SlurmExecutor._submitit_command_str)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = RunDir(run_dir).slurm
    command = " ".join(
        [shlex.quote(python), "-u -m submitit.core._submit", shlex.quote(str(folder))]
    )
    return _make_sbatch_string(command=command, folder=folder, **parameters)


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

    def prepare(self, plan: Plan) -> SlurmRequest:
        parameters = sbatch_parameters(plan)
        python = plan.launch[0]  # the plan's interpreter: the job sees the same environment
        return SlurmRequest(
            run_dir=plan.run_dir,
            python=python,
            parameters=parameters,
            script=sbatch_script(parameters, plan.run_dir, python),
            launch=tuple(plan.launch),
            env=dict(plan.env),
            secrets=tuple(plan.secrets),
            max_requeues=plan.recipe.resources.max_requeues,
            save_timeout_s=save_timeout_s(plan),
        )

    def submit(self, request: SlurmRequest) -> int:
        """Queue the job (0), or RunError when sbatch is missing or refuses it."""
        import submitit

        if shutil.which("sbatch") is None or shutil.which("srun") is None:
            raise RunError(
                "sbatch/srun are not on PATH: submit from a SLURM login node "
                "(`--dry-run` prints the job without submitting it)"
            )
        record_request(request)
        try:
            job = request.executor().submit(request.task())
        except submitit.core.utils.FailedJobError as exc:  # sbatch refused the script
            raise RunError(
                f"sbatch refused the job: {str(exc).strip()}\n  fix resources.* in the recipe; "
                "`--dry-run` prints the script"
            ) from None
        run = Path(request.run_dir)
        nodes = request.parameters["nodes"]
        record = JobRecord(
            backend="slurm",
            job_id=str(job.job_id),
            state="PENDING",
            extra={
                "tasks": nodes,
                "submitted": time.time(),
                "submission_file": str(job.paths.submission_file),
            },
        )
        record.save(run)
        print(f"submitted SLURM job {job.job_id} ({nodes} node(s)) for {run}")
        print(f"  follow it: tune-launch status {run}  |  tune-launch logs {run} --follow")
        print(f"  stop it:   tune-launch cancel {run}")
        return 0

    # --- following a job from its run directory
    def status(self, run_dir: Path) -> JobRecord:
        record = JobRecord.load(run_dir)
        if record is None or record.backend != "slurm":
            raise RunError(f"no SLURM job recorded in {RunDir(run_dir).job_file}")
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
            record.error = _error(RunDir(run_dir), record, raw)
        return record

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
        run = RunDir(run_dir)
        record = JobRecord.load(run.path)
        files = [run.rank_log(rank)]
        if record is not None:
            for task in _tasks(run, record):
                files += [task.stdout, task.stderr]
        if not follow:
            for path in files:
                if path.exists():
                    yield f"==> {path} <=="
                    yield from path.read_text(errors="replace").splitlines()
            return
        yield from _follow(files[0], lambda: self.status(run_dir).state in ENDED)

    def wait(self, run_dir: Path, poll_s: float = 2.0) -> int:
        """Follow the job to its end, printing state changes and the training's logged steps;
        0 if it completed, else 1."""
        last = None
        progress = _Progress(RunDir(run_dir))
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
            if record.state in ENDED and _settled(record):
                record.save(run_dir)
                if record.state == "COMPLETED":
                    return 0
                print(f"job {record.job_id} {record.state}: {record.error}", file=sys.stderr)
                return 1
            time.sleep(poll_s)


def _settled(record: JobRecord) -> bool:
    # a PREEMPTED job that SLURM requeues comes back as PENDING: check it is really gone
    if record.state != "PREEMPTED":
        return True
    return _squeue_state(record.job_id) is None


def _tasks(run: RunDir, record: JobRecord) -> list[Any]:
    """submitit's paths (JobPaths: stdout, stderr, result_pickle) of each task of the job."""
    from submitit.core.utils import JobPaths

    count = int(record.extra.get("tasks", 1))
    return [JobPaths(run.slurm, job_id=record.job_id, task_id=task) for task in range(count)]


def _error(run: RunDir, record: JobRecord, raw: str) -> str | None:
    """Why the job ended: the node tasks' own reports, else submitit's, else SLURM's state,
    else the last line a task wrote to stderr."""
    errors = run.node_errors(record.job_id)
    if errors:
        messages = [json.loads(p.read_text())["message"] for p in errors]
        return "; ".join(dict.fromkeys(messages))  # each task reports; say each thing once
    from submitit.core.utils import pickle_load

    tasks = _tasks(run, record)
    for task in tasks:
        try:
            outcome, trace = pickle_load(task.result_pickle)
        except Exception:  # no pickle, or a half-written one: ignore
            continue
        if outcome == "error":
            lines = [line for line in str(trace).splitlines() if line.strip()]
            return lines[-1] if lines else "failed"
    if raw.startswith("CANCELLED"):
        return raw.lower()
    for task in tasks:
        if task.stderr.exists():
            text = task.stderr.read_text(errors="replace")
            lines = [line for line in text.splitlines() if line.strip()]
            if lines:
                return lines[-1]
    return raw


class _Progress:
    """The training records of metrics.jsonl not shown yet, as short lines."""

    def __init__(self, run: RunDir) -> None:
        self.run, self.seen = run, 0

    def new_lines(self) -> list[str]:
        records = self.run.metrics()
        if len(records) < self.seen:  # rewound on resume: show it again
            self.seen = 0
        new, self.seen = records[self.seen :], len(records)
        lines = []
        for rec in new:
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
