"""What each SLURM task runs: one task per node starts that node's launcher (torchrun or
accelerate launch, the plan's launch argv) and watches it.

submitit pickles a `NodeTask` and runs it in every task of the job (`srun`, one per node).
The task carries the node command of the SLURM request (cluster/slurm.py: the plan's launch
argv and plan.env), fills the argv's per-node placeholders from the step's own environment
(cluster/rank_env.py), runs the launcher as a subprocess with os.environ + plan.env, and turns
its end into submitit's outcomes:

- the launcher exits 0: the task returns (the job completes);
- the launcher fails: the task raises with the first error of the training log, naming the
  node (the job fails; it is never requeued for a real error);
- SIGUSR2 (the time limit's signal, sbatch `--signal=USR2@<signal_lead_s>`, or
  `scancel --signal=USR2 JOB` / submitit's `job._interrupt(timeout=True)`): SLURM delivers it to
  every process of the step. The launcher ignores it (started with USR2 ignored); the
  training ranks catch it (TUNE_LAUNCH_SAVE_SIGNAL), agree at the next step boundary, save a
  complete checkpoint, write RUN_DIR/PREEMPTED and exit 0. On task 0, submitit's handler
  calls `checkpoint()`, which waits for that save and returns a resubmission of this task:
  submitit requeues the job, which resumes from the checkpoint in the same run directory on
  a new rendezvous port (SLURM_RESTART_COUNT);
- SIGTERM first (preemption, submitit's `job._interrupt()`, cancellation, the hard time
  limit): torchrun stops the ranks; the task then waits for what follows (USR2 -> requeue,
  resuming from the last periodic checkpoint; otherwise SIGKILL) instead of returning early.

Requeues are bounded by resources.max_requeues.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import UncompletedJobError

from cluster import rank_env
from cluster.diagnose import Failure, error_summary, first_failure, read_end
from launcher import process
from launcher.rundir import RunDir

SAVE_SIGNAL = "SIGUSR2"  # submitit's preemption/timeout signal (SUBMITIT_PREEMPT_SIGNAL)
WAIT_FOR_KILL_S = 180  # after SIGTERM or a save, how long a task waits for the requeue/kill
STOP_GRACE_S = 10.0  # SIGTERM to SIGKILL when the task stops what is left of its launcher

Handler = Callable[[int, types.FrameType | None], Any] | int | None


def _say(message: str) -> None:
    print(f"[tune-launch node {os.environ.get('SLURMD_NODENAME', '?')}] {message}", flush=True)


def _ignore_save_signal() -> None:  # runs in the launcher's child before exec
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def failure_message(run: RunDir, failure: Failure, launcher_log: str) -> str | None:
    """The first failing rank (cluster/diagnose.py), its node (from its pre-flight line) and
    the root exception from its log; None when no rank is known to have failed."""
    if failure.rank is None:
        return None
    if failure.signal:
        return (
            f"training failed on node {_node()}: rank {failure.rank} was killed by {failure.signal}"
        )
    text = read_end(run.rank_log(failure.rank), 256 * 1024)
    nodes = re.findall(rf"\(node (\S+), rank {failure.rank}\)", text)
    start = text.rfind(f"training failed on rank {failure.rank}")
    summary = error_summary(text[start:] if start >= 0 else text or launcher_log)
    where = f"on node {nodes[-1]} " if nodes else ""  # no pre-flight line: the summary says
    return f"training failed {where}(rank {failure.rank}): {summary}"


class NodeTask(submitit.helpers.Checkpointable):
    """The callable submitit runs in each task (one per node). Picklable; runtime state is not.

    launch / env: the node command (placeholders unfilled) and plan.env, from the request."""

    def __init__(
        self,
        run_dir: str,
        *,
        launch: list[str],
        env: dict[str, str],
        max_requeues: int,
        save_timeout_s: float,
    ) -> None:
        self.run_dir = str(run_dir)
        self.launch = list(launch)
        self.env = dict(env)
        self.max_requeues = max_requeues
        self.save_timeout_s = save_timeout_s
        self.requeues = 0
        self._reset_runtime()

    # --- pickling: only the persistent fields travel to the requeued job
    _PERSISTENT = ("run_dir", "launch", "env", "max_requeues", "save_timeout_s", "requeues")

    def __getstate__(self) -> dict[str, Any]:
        return {k: self.__dict__[k] for k in self._PERSISTENT}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._signals: dict[str, float] = {}
        self._completed = False
        self._started = 0.0

    @property
    def _run(self) -> RunDir:
        return RunDir(self.run_dir)

    # --- the task
    def __call__(self) -> dict[str, Any]:
        values = rank_env.node_values()
        node_rank = int(values["node_rank"])
        task = int(os.environ.get("SLURM_PROCID", "0"))
        argv = rank_env.fill(self.launch, values)
        env = {
            **os.environ,
            **self.env,
            "TUNE_LAUNCH_SAVE_SIGNAL": SAVE_SIGNAL,
            "TUNE_LAUNCH_NODE_NAME": os.environ.get("SLURMD_NODENAME", socket.gethostname()),
        }
        env.pop("LOCAL_SIZE", None)  # DeepSpeed would leave shared-memory buffers behind
        if task == 0:
            self._run.preempted_marker.unlink(missing_ok=True)
        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        _say(
            f"node_rank={node_rank} of {os.environ.get('SLURM_JOB_NUM_NODES', '?')}, master "
            f"{values['master_addr']}:{values['master_port']}, restart {restart}, "
            f"requeues so far {self.requeues}"
        )
        _say("launch: " + " ".join(argv))
        self._record_signals()
        stderr_path = self._stderr_path()
        offset = stderr_path.stat().st_size if stderr_path and stderr_path.exists() else 0
        self._started = time.time()
        try:
            self._proc = subprocess.Popen(argv, env=env, preexec_fn=_ignore_save_signal)
            # poll, never Popen.wait(): wait() holds a lock that the signal handler's own
            # wait for the saving ranks (checkpoint(), same thread) could then never take
            while (code := _exit_code(self._proc)) is None:
                time.sleep(0.5)
            return self._after_exit(code, node_rank, task, stderr_path, offset)
        except UncompletedJobError:
            if self._completed:  # USR2 raced the normal end: the training finished
                _say("training finished while a save signal arrived: not requeued")
                return {"node_rank": node_rank, "exit_code": 0}
            raise
        finally:
            self._stop_launcher()

    def _after_exit(
        self, code: int, node_rank: int, task: int, stderr_path: Path | None, offset: int
    ) -> dict[str, Any]:
        saved = self._run.preempted_marker.exists()
        if code == 0 and not saved:  # the training finished
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # a late USR2 must not requeue now
            _say("launcher exited 0")
            return {"node_rank": node_rank, "exit_code": 0}
        if code != 0 and not self._signals:
            time.sleep(2)  # a SIGTERM that stopped the launcher may still be on its way to us
        if saved or self._signals:
            if task == 0 and saved and SAVE_SIGNAL not in self._signals:
                # the ranks saved on a signal this task did not get: requeue through submitit
                _say("the ranks saved on a save signal: asking submitit to requeue")
                os.kill(os.getpid(), signal.SIGUSR2)
            what = "saving a checkpoint" if saved else f"{', '.join(self._signals)} (exit {code})"
            _say(f"launcher stopped after {what}: waiting for the requeue or the kill")
            deadline = time.monotonic() + self.save_timeout_s + WAIT_FOR_KILL_S
            while time.monotonic() < deadline:
                time.sleep(1)
            raise RuntimeError(
                f"node {_node()}: the launcher stopped after {what} but the job was neither "
                f"requeued nor killed within {self.save_timeout_s + WAIT_FOR_KILL_S:.0f}s"
            )
        log = ""
        if stderr_path and stderr_path.exists():
            with stderr_path.open("rb") as f:
                f.seek(offset)
                log = f.read().decode("utf-8", "replace")
        # the run directory is shared by the nodes: allow for their clocks' difference
        failure = first_failure(self._run, log, since=self._started - 1)
        message = failure_message(self._run, failure, log) or (
            f"training failed on node {_node()} (node_rank {node_rank}, launcher exit code "
            f"{code}): {error_summary(log)}"
        )
        self._write_error(node_rank, code, message, log)
        raise RuntimeError(message)

    # --- submitit's hook, on task 0, inside its USR2 handler
    # None (submitit: "not requeued") is a return submitit handles; its stub does not say so
    def checkpoint(  # type: ignore[override]
        self, *args: Any, **kwargs: Any
    ) -> submitit.helpers.DelayedSubmission | None:
        proc = self._proc
        if proc is not None and _exit_code(proc) is None:
            _say(f"save signal: waiting up to {self.save_timeout_s:.0f}s for the ranks to save")
            deadline = time.monotonic() + self.save_timeout_s
            while _exit_code(proc) is None and time.monotonic() < deadline:
                time.sleep(0.5)
            if _exit_code(proc) is None:
                _say("the ranks did not finish saving in time: resuming from the last checkpoint")
        marker = self._run.preempted_marker
        if proc is not None and _exit_code(proc) == 0 and not marker.exists():
            self._completed = True  # the training had finished: nothing to requeue
            return None
        if self.requeues >= self.max_requeues:
            self._stop_launcher()
            raise RuntimeError(
                f"preempted or timed out {self.requeues + 1} times; resources.max_requeues="
                f"{self.max_requeues} allows {self.max_requeues} requeues. Resubmit the same "
                "run directory to resume from its last checkpoint."
            )
        saved = marker.read_text().strip() if marker.exists() else "no save on signal"
        self.requeues += 1
        _say(f"requeueing (requeue {self.requeues} of at most {self.max_requeues}; {saved})")
        self._stop_launcher()
        return super().checkpoint(*args, **kwargs)

    # --- helpers
    def _record_signals(self) -> None:
        """Remember SIGTERM/SIGUSR2 (and pass them on to submitit's handlers)."""
        for sig in (signal.SIGTERM, signal.SIGUSR2):
            previous: Handler = signal.getsignal(sig)

            def handler(
                signum: int, frame: types.FrameType | None, previous: Handler = previous
            ) -> None:
                name = signal.Signals(signum).name
                self._signals.setdefault(name, time.time())
                _say(f"received {name}")
                if callable(previous):
                    previous(signum, frame)

            signal.signal(sig, handler)

    def _stderr_path(self) -> Path | None:
        try:
            return Path(submitit.JobEnvironment().paths.stderr)
        except (KeyError, RuntimeError):
            return None

    def _write_error(self, node_rank: int, code: int, message: str, log: str) -> None:
        path = self._run.node_error(os.environ.get("SLURM_JOB_ID", "0"), node_rank)
        record = {
            "node": _node(),
            "node_rank": node_rank,
            "exit_code": code,
            "message": message,
            "log_tail": log.splitlines()[-40:],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2))

    def _stop_launcher(self) -> None:
        """Stop what is left of the launcher's process tree (never other processes). The
        launcher shares this task's process group, so its tree is signalled, not the group;
        it is reaped by _exit_code only (safe inside the save signal's handler)."""
        proc = self._proc
        if proc is None or _exit_code(proc) is not None:
            return
        process.stop(proc.pid, STOP_GRACE_S, group=False, reap=lambda: _exit_code(proc))
        while _exit_code(proc) is None:
            time.sleep(0.1)


def _exit_code(proc: subprocess.Popen[bytes]) -> int | None:
    """The launcher's exit code once it has exited, else None; safe inside a signal handler
    (os.waitpid directly: Popen's own poll/wait skip reaping while another call holds its lock)."""
    if proc.returncode is not None:
        return proc.returncode
    try:
        pid, status = os.waitpid(proc.pid, os.WNOHANG)
    except ChildProcessError:  # reaped by Popen meanwhile
        return proc.returncode
    if pid == 0:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode


def _node() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()
