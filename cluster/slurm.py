"""SLURM through submitit: one task per node runs that node's launcher (cluster/node_entry.py).

`prepare(plan)` -> SlurmRequest: the sbatch parameters (from the plan alone), the script
submitit renders from them (its own renderer: what the dry run prints is the script submitit
writes) and each node's command, then the jobs chained after training (StageRequest: merge,
eval; cluster/stages.py, for the stages the backend was chosen with); `submit(request)` asks
`sbatch --test-only` about every job, then hands exactly those to submitit. The chain is
followed from the run directory (cluster/chain.py): RUN_DIR/job.json names the jobs,
RUN_DIR/slurm/ holds submitit's scripts, pickles and per-task stdout/stderr, and sacct /
squeue / scontrol say the states. `wait` and `logs --follow` print the stage transitions and
the training's progress lines (Watcher).

Environment: sbatch exports the submitting shell's environment to the job (SLURM's default,
--export=ALL), so secrets (recipe.secrets) reach the ranks without ever being written to a
script; plan.env is added per node by the node task.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster import chain
from cluster.base import ENDED, JobRecord, record_request
from cluster.node_entry import NodeTask
from cluster.stages import ALL_STAGES, StageTask, job_name, later_stages, stage_parameters
from launcher.config.plan import Plan
from launcher.config.recipe import time_minutes
from launcher.errors import RunError
from launcher.rundir import RunDir
from launcher.train.progress import progress_line

# srun: when one node's task fails, stop the others instead of letting them hang in a
# collective until the NCCL/gloo timeout
SRUN_ARGS = ["--kill-on-bad-exit=1"]


def sbatch_parameters(plan: Plan) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters for the plan (its names; rendered as #SBATCH)."""
    res = plan.recipe.resources
    params: dict[str, Any] = {
        "job_name": job_name(plan.name, "train"),
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
class StageRequest:
    """A job chained after training (cluster/stages.py): submitit's executor with
    `parameters` and `--dependency=afterok:<the job of stage `after`>` runs StageTask(stage)."""

    stage: str
    after: str
    run_dir: str
    python: str
    parameters: dict[str, Any]

    def script(self, after_id: str | None = None) -> str:
        """The sbatch script submitit writes (the dry run shows the dependency's job id as
        a placeholder: it exists once the job before is queued)."""
        return sbatch_script(self._parameters(after_id), self.run_dir, self.python)

    def _parameters(self, after_id: str | None) -> dict[str, Any]:
        dependency = f"afterok:{after_id or '<job id of ' + self.after + '>'}"
        extra = {**self.parameters.get("additional_parameters", {}), "kill-on-invalid-dep": "yes"}
        return {**self.parameters, "dependency": dependency, "additional_parameters": extra}

    def executor(self, after_id: str) -> Any:
        import submitit

        executor = submitit.SlurmExecutor(
            folder=RunDir(self.run_dir).slurm, max_num_timeout=0, python=shlex.quote(self.python)
        )
        executor.update_parameters(**self._parameters(after_id))
        return executor

    def task(self) -> StageTask:
        return StageTask(self.stage, self.run_dir)


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
    followers: tuple[StageRequest, ...] = ()  # merge, eval: queued at once, after training

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
        for follower in self.followers:
            title = (
                f"then the {follower.stage} job, queued at once: runs cluster.stages.StageTask("
                f"{follower.stage!r}, {self.run_dir!r}) once {follower.after} completed"
            )
            sections[title] = follower.script().rstrip()
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


class SlurmBackend:
    """The Backend protocol on SLURM, through submitit: the training job and the stages the
    run includes after it (`stages`, --stages) as a chain of jobs (cluster/chain.py)."""

    name = "slurm"

    def __init__(self, stages: tuple[str, ...] | list[str] = ALL_STAGES) -> None:
        self.stages = tuple(stages)

    def prepare(self, plan: Plan) -> SlurmRequest:
        parameters = sbatch_parameters(plan)
        python = plan.launch[0]  # the plan's interpreter: the job sees the same environment
        followers, after = [], "train"
        for stage in later_stages(plan, self.stages):
            params = stage_parameters(plan, stage)
            followers.append(StageRequest(stage, after, plan.run_dir, python, params))
            after = stage
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
            followers=tuple(followers),
        )

    def submit(self, request: SlurmRequest) -> int:
        """Queue the chain (0); RecipeError when SLURM says a job can never run (nothing is
        queued), RunError when sbatch is missing or refuses a job."""
        if shutil.which("sbatch") is None or shutil.which("srun") is None:
            raise RunError(
                "sbatch/srun are not on PATH: submit from a SLURM login node "
                "(`--dry-run` prints the job without submitting it)"
            )
        chain.test_only("train", request.script, request.parameters)
        for follower in request.followers:
            chain.test_only(follower.stage, follower.script("1"), follower.parameters)
        record_request(request)
        run = Path(request.run_dir)
        nodes = request.parameters["nodes"]
        job = _submit(lambda: request.executor().submit(request.task()), [])
        jobs = [{"stage": "train", "job_id": str(job.job_id), "tasks": nodes}]
        ids = {"train": str(job.job_id)}
        for follower in request.followers:
            queued = [j["job_id"] for j in jobs]
            after = ids[follower.after]
            stage_job = _submit(lambda f=follower, a=after: f.executor(a).submit(f.task()), queued)
            ids[follower.stage] = str(stage_job.job_id)
            jobs.append({"stage": follower.stage, "job_id": str(stage_job.job_id), "tasks": 1})
        requests = {"train": request.parameters}
        requests |= {f.stage: f.parameters for f in request.followers}
        record = JobRecord(
            backend="slurm",
            job_id=str(job.job_id),
            state="PENDING",
            extra={
                "tasks": nodes,
                "submitted": time.time(),
                "submission_file": str(job.paths.submission_file),
                "chain": jobs,
                "requests": requests,
                "partition": request.parameters.get("partition"),
            },
        )
        record.save(run)
        print(f"submitted SLURM job {job.job_id} (training, {nodes} node(s)) for {run}")
        if len(jobs) > 1:
            then = ", then ".join(f"{j['stage']} {j['job_id']}" for j in jobs[1:])
            print(f"  chained after it: {then} (each starts once the one before completed)")
        print(f"  follow it: tune-launch status {run}  |  tune-launch logs {run} --follow")
        print(f"  stop it:   tune-launch cancel {run}")
        return 0

    # --- following a job from its run directory
    def status(self, run_dir: Path) -> JobRecord:
        record = chain.require_record(run_dir)
        return chain.record_state(run_dir, record)

    def cancel(self, run_dir: Path) -> None:
        record = self.status(run_dir)
        live = [s["job_id"] for s in record.extra["stages"] if s["state"] in chain.LIVE]
        from cluster import endpoint

        live += endpoint.live_job(run_dir)
        if not live:
            print(f"the jobs of {run_dir} already ended: {record.state}")
            return
        subprocess.run(["scancel", *live], check=True, timeout=30)
        print(f"cancelled SLURM job(s) {' '.join(live)}")

    def logs(self, run_dir: Path, rank: int, follow: bool) -> Iterator[str]:
        """The rank's log, then submitit's per-task stdout/stderr of the training job (lines);
        with follow, the rank's log as it grows, until the job ends."""
        run = RunDir(run_dir)
        record = JobRecord.load(run.path)
        files = [run.rank_log(rank)]
        if record is not None:
            for task in chain.job_tasks(run, record.job_id, int(record.extra.get("tasks", 1))):
                files += [task.stdout, task.stderr]
        if not follow:
            yield from read_files(files)
            return
        yield from follow_file(files[0], lambda: self.status(run_dir).state in ENDED)

    def wait(self, run_dir: Path, poll_s: float = 2.0) -> int:
        """Follow the chain to its end, printing each stage's transitions and the training's
        progress lines; 0 if every stage completed, else 1."""
        watcher = Watcher(RunDir(run_dir))
        while True:
            record = self.status(run_dir)
            for line in watcher.lines(record):
                print(line, flush=True)
            if record.state in ENDED and _settled(record):
                record.save(run_dir)
                if record.state == "COMPLETED":
                    return 0
                print(f"{run_dir} {record.state}: {record.error}", file=sys.stderr)
                return 1
            time.sleep(poll_s)


def _submit(submit: Any, queued: list[str]) -> Any:
    """One sbatch through submitit; when it is refused, the jobs queued before are cancelled."""
    import submitit

    try:
        return submit()
    except submitit.core.utils.FailedJobError as exc:  # sbatch refused the script
        chain.cancel_jobs(queued)
        raise RunError(
            f"sbatch refused the job: {str(exc).strip()}\n  fix resources.* in the recipe; "
            "`--dry-run` prints the script"
        ) from None


def _settled(record: JobRecord) -> bool:
    # a PREEMPTED job that SLURM requeues comes back as PENDING: check it is really gone
    if record.state != "PREEMPTED":
        return True
    out = subprocess.run(
        ["squeue", "-h", "-j", record.job_id, "-o", "%T"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return not out.stdout.strip()


class Watcher:
    """What `--wait` and `logs --follow` print: each stage's transitions (state, job, node,
    reason) and, while training runs, one progress line per logged step (metrics.jsonl)."""

    def __init__(self, run: RunDir) -> None:
        self.run, self.seen = run, 0
        self.shown: dict[str, str] = {}  # stage -> the line last shown
        self.accounting_said = False

    def lines(self, record: JobRecord) -> list[str]:
        out: list[str] = []
        error = record.extra.get("accounting_error")
        if error and not self.accounting_said:
            out.append(f"note: {error}; states from squeue/scontrol and the run directory")
            self.accounting_said = True
        for stage in record.extra.get("stages", []):
            if stage["stage"] == "train":
                out += self.progress()
            where = f" on {stage['node']}" if stage["state"] == "RUNNING" and stage["node"] else ""
            why = (
                f" ({stage['reason']})"
                if stage["state"] == "PENDING" and stage["reason"] not in ("", "None")
                else ""
            )
            again = f", requeued {stage['requeues']}x" if stage.get("requeues") else ""
            text = f"{stage['stage']}: job {stage['job_id']} {stage['state']}{where}{why}{again}"
            if stage["state"] in ("FAILED", "CANCELLED") and stage.get("error"):
                text += f": {stage['error']}"
            if self.shown.get(stage["stage"]) != text:
                self.shown[stage["stage"]] = text
                out.append(text)
            if (
                stage["stage"] == "eval"
                and stage["state"] == "COMPLETED"
                and "headline" not in self.shown
            ):
                self.shown["headline"] = "yes"
                out += [f"  {line}" for line in eval_lines(self.run)]
        return out

    def progress(self) -> list[str]:
        records = self.run.metrics()
        if len(records) < self.seen:  # rewound on resume: show it again
            self.seen = 0
        new, self.seen = records[self.seen :], len(records)
        return [f"  {line}" for rec in new if (line := progress_line(rec))]


def eval_lines(run: RunDir) -> list[str]:
    """The eval headline from RUN_DIR/eval/results.json, and where the report is."""
    import json

    from cluster.stages import eval_headline

    try:
        results = json.loads(run.eval_results.read_text())
    except (OSError, ValueError):
        return []
    return [*eval_headline(results), f"report: {run.eval_report}"]


def read_files(files: list[Path]) -> Iterator[str]:
    for path in files:
        if path.exists():
            yield f"==> {path} <=="
            yield from path.read_text(errors="replace").splitlines()


def follow_file(path: Path, ended: Any, poll_s: float = 1.0) -> Iterator[str]:
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
