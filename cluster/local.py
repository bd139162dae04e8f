"""The local backend: one node, the plan's launch command (torchrun / accelerate launch) as a
subprocess in its own process group, in the foreground.

- `prepare(plan)` -> LocalRequest: the command, plan.env (merged over this process's
  environment), the secrets' names (they reach the ranks only through that inherited
  environment, never through a file), the working directory and the number of attempts.
  `submit(request)` runs exactly that. The run directory's lock is the caller's (the
  pipeline holds it around the whole run).
- RUN_DIR/job.json records the job (backend local, an id, the process group), its state and
  its error; `status`, `wait`, `cancel` and `logs` work from the run directory alone.
- The launcher's output (rank 0's progress; other ranks write to logs/rank{N}.log) streams to
  the terminal and to logs/launcher.log.
- A rank that dies takes the others down: torchrun runs with --max-restarts=0 and a 1 s
  monitor, and stops the surviving workers as soon as one fails, well before any collective
  timeout. The failing rank and the end of its log are reported (exit 1).
- train.restarts > 0: the launch is started again; the rank resumes from the last complete
  checkpoint by itself.
- Ctrl-C / SIGTERM / `tune-launch cancel`: the process group and every rank are stopped
  (launcher/process.py: SIGTERM, SIGKILL after a grace period).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from cluster.base import ENDED, JobRecord, record_request
from cluster.diagnose import first_failure, tail
from launcher import process
from launcher.config.plan import Plan
from launcher.errors import RunError
from launcher.rundir import RunDir

log = logging.getLogger("tune_launch")

GRACE_S = 20.0


@dataclass(frozen=True)
class LocalRequest:
    """What the local backend runs: `argv` in `cwd`, with `env` over this process's
    environment, `attempts` times at most (1 + train.restarts) until one succeeds."""

    run_dir: str
    argv: tuple[str, ...]
    env: dict[str, str]
    secrets: tuple[str, ...]
    cwd: str
    attempts: int

    def render(self) -> str:
        run = RunDir(self.run_dir)
        secrets = " ".join(self.secrets) + " (from this environment, never written)"
        rows = [
            ("cwd", shlex.quote(self.cwd)),
            ("command", shlex.join(self.argv)),
            *(("env", f"{k}={shlex.quote(v)}") for k, v in sorted(self.env.items())),
            ("secrets", secrets if self.secrets else "none"),
            ("output", f"this terminal and {run.launcher_log}; every rank logs in {run.logs}"),
            (
                "attempts",
                f"{self.attempts} (1 + train.restarts; a relaunch resumes from the "
                "last complete checkpoint)",
            ),
        ]
        title = "--- local launch (a subprocess in its own process group, on this host)"
        return "\n".join([title, *(f"{key:<9} {value}" for key, value in rows)])


class LocalBackend:
    name = "local"

    def __init__(self, grace_s: float = GRACE_S) -> None:
        self.grace_s = grace_s
        self._stop_signal: int | None = None

    def prepare(self, plan: Plan) -> LocalRequest:
        return LocalRequest(
            run_dir=plan.run_dir,
            argv=tuple(plan.launch),
            env=dict(plan.env),
            secrets=tuple(plan.secrets),
            cwd=os.getcwd(),
            attempts=1 + plan.recipe.train.restarts,
        )

    def submit(self, request: LocalRequest) -> int:
        """Run the request in the foreground: 0 when an attempt succeeds, else 1 (130 after
        Ctrl-C)."""
        record_request(request)
        run = RunDir(request.run_dir)
        run.logs.mkdir(parents=True, exist_ok=True)
        run.cancel_file.unlink(missing_ok=True)
        record = JobRecord(
            backend="local",
            job_id=uuid.uuid4().hex[:12],
            state="RUNNING",
            extra={"host": socket.gethostname(), "launcher_pid": os.getpid(), "attempt": 0},
        )
        with self._catching_signals():
            for attempt in range(1, request.attempts + 1):
                started = time.time()
                code, output = self._launch_once(request, record, attempt)
                if code == 0:
                    record.state, record.error = "COMPLETED", None
                    record.save(run.path)
                    return 0
                if self._stop_signal is not None or run.cancel_file.exists():
                    record.state, record.error = "CANCELLED", "stopped by a signal or cancel"
                    record.save(run.path)
                    print(
                        f"training stopped; resume it by running the same command again "
                        f"(run dir {run.path})",
                        file=sys.stderr,
                    )
                    return 130 if self._stop_signal == signal.SIGINT else 1
                failure = first_failure(run, output, started)
                how = f"killed by {failure.signal}, " if failure.signal else ""
                record.error = (
                    f"{failure.where} failed ({how}exit code {code}) on attempt {attempt}"
                )
                if attempt < request.attempts:
                    log.warning(
                        "%s; restarting from the last complete checkpoint (restart %d of %d)",
                        record.error,
                        attempt,
                        request.attempts - 1,
                    )
                    record.save(run.path)
                    continue
                record.state = "FAILED"
                record.save(run.path)
                rank = failure.rank if failure.rank is not None else 0
                lines = tail(run.rank_log(rank)) or tail(run.launcher_log)
                print(
                    f"error: training failed: {record.error}\n--- last lines of "
                    f"{run.rank_log(rank)}:\n{lines}\n---\nfull logs: tune-launch logs "
                    f"{run.path} --rank {rank}",
                    file=sys.stderr,
                )
        return 1

    @contextlib.contextmanager
    def _catching_signals(self) -> Iterator[None]:
        """Ctrl-C and SIGTERM stop the launch instead of this process (main thread only)."""
        self._stop_signal = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self._stop_signal = signum

        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, on_signal)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _launch_once(
        self, request: LocalRequest, record: JobRecord, attempt: int
    ) -> tuple[int, str]:
        """One attempt: the output streamed to the terminal and logs/launcher.log; returns the
        exit code and the output's last 256 KiB."""
        run = RunDir(request.run_dir)
        log.info("launch (attempt %d): %s", attempt, shlex.join(request.argv))
        launcher_log = run.launcher_log.open("ab")
        proc = subprocess.Popen(
            request.argv,
            env={**os.environ, **request.env},
            cwd=request.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: signals reach every rank
        )
        record.pids = [proc.pid]
        record.extra |= {"pgid": proc.pid, "attempt": attempt, "started": time.time()}
        record.save(run.path)
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        kept = bytearray()
        out = getattr(sys.stderr, "buffer", None)
        stopper: threading.Thread | None = None
        try:
            while True:
                if self._stop_signal is not None and stopper is None:
                    log.warning(
                        "stopping the run (signal %d): SIGTERM to its processes", self._stop_signal
                    )
                    # stopped in a thread: this one keeps reading the output until it ends
                    stopper = threading.Thread(target=self._stop, args=(proc,), daemon=True)
                    stopper.start()
                ready, _, _ = select.select([fd], [], [], 0.5)
                if not ready:
                    if proc.poll() is not None and not process.group_alive(proc.pid):
                        break
                    continue
                try:
                    chunk = os.read(fd, 65536)
                except InterruptedError:
                    continue
                if not chunk:
                    break
                launcher_log.write(chunk)
                launcher_log.flush()
                if out is not None:
                    out.write(chunk)
                    out.flush()
                kept += chunk
                del kept[: max(0, len(kept) - 256 * 1024)]
            code = proc.wait()
        finally:
            if stopper is not None:
                stopper.join()
            if proc.poll() is None or process.group_alive(proc.pid):
                self._stop(proc)
                proc.wait()
            launcher_log.close()
        return code, kept.decode("utf-8", errors="replace")

    def _stop(self, proc: subprocess.Popen[bytes]) -> None:
        process.stop(proc.pid, self.grace_s, group=True, reap=proc.poll)

    # ---- from the run directory alone

    def status(self, run_dir: Path) -> JobRecord:
        record = JobRecord.load(Path(run_dir))
        if record is None:
            return JobRecord(backend="local", job_id="", state="UNKNOWN", error="no job.json")
        same_host = record.extra.get("host") == socket.gethostname()
        launcher = record.extra.get("launcher_pid")
        if (
            record.state == "RUNNING"
            and same_host
            and launcher
            and not process.pid_alive(int(launcher))
        ):
            pgid = record.extra.get("pgid")
            if not (pgid and process.group_alive(int(pgid))):
                record.state = "FAILED"
                record.error = "the launcher process is gone (killed?) and left no result"
        return record

    def wait(self, run_dir: Path, poll_s: float = 1.0) -> int:
        """Follow a local job (the launcher may be another process) until it ends."""
        while (state := self.status(run_dir).state) not in (*ENDED, "UNKNOWN"):
            time.sleep(poll_s)
        return 0 if state == "COMPLETED" else 1

    def cancel(self, run_dir: Path) -> None:
        run = RunDir(run_dir)
        record = JobRecord.load(run.path)
        if record is None or record.backend != "local":
            raise RunError(f"no local job recorded in {run.job_file}")
        run.cancel_file.write_text(str(os.getpid()))
        pgid = record.extra.get("pgid")
        if record.state == "RUNNING" and pgid and process.group_alive(int(pgid)):
            process.stop(int(pgid), self.grace_s, group=True)
        launcher = record.extra.get("launcher_pid")
        if not (launcher and process.pid_alive(int(launcher))):
            record.state, record.error = "CANCELLED", "cancelled"
            record.save(run.path)

    def logs(self, run_dir: Path, rank: int, follow: bool) -> Iterator[str]:
        path = RunDir(run_dir).rank_log(rank)
        while not path.is_file():
            if not follow or self.status(run_dir).state not in ("RUNNING", "PENDING"):
                return
            time.sleep(0.5)
        with path.open(encoding="utf-8", errors="replace") as fh:
            while True:
                line = fh.readline()
                if line:
                    yield line.rstrip("\n")
                    continue
                if not follow or self.status(run_dir).state not in ("RUNNING", "PENDING"):
                    return
                time.sleep(0.5)
