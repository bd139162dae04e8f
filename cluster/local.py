"""The local backend: one node, the plan's launch command (torchrun / accelerate launch) as a
subprocess in its own process group.

- plan.env is merged into this process's environment; secrets reach the ranks only through
  that inherited environment, never through a file.
- RUN_DIR/.lock (fcntl) is held for the whole run: a second run in the same directory refuses.
- RUN_DIR/job.json records the job (backend local, a uuid, the process group), its state and
  its error; `status`, `cancel` and `logs` work from the run directory alone.
- The launcher's output (rank 0's progress; other ranks write to logs/rank{N}.log) streams to
  the terminal and to logs/launcher.log.
- A rank that dies takes the others down: torchrun runs with --max-restarts=0 and a 1 s
  monitor, and stops the surviving workers as soon as one fails, well before any collective
  timeout. The failing rank and the end of its log are reported (exit 1).
- train.restarts > 0: the launch is started again; train.py resumes from the last complete
  checkpoint by itself.
- Ctrl-C / SIGTERM: SIGTERM to the process group, SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import shlex
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from cluster.base import JobRecord
from launcher.config.plan import Plan
from launcher.errors import RunError

log = logging.getLogger("tune_launch")

CANCEL_FILE = ".cancel"
GRACE_S = 20.0
TAIL_LINES = 25


# --------------------------------------------------------------------------------------------
# Process groups


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(pgid: int, grace_s: float = GRACE_S) -> None:
    """SIGTERM to the group, SIGKILL to what is left after grace_s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# Diagnosis of a failed launch


def failing_rank(run_dir: Path, output: str, since: float) -> int | None:
    """The rank that failed first: torchrun's root-cause report, else the oldest .error file
    written by a rank since the launch started."""
    root = output.rfind("Root Cause")
    if root >= 0:
        match = re.search(r"rank\s*:\s*(\d+)", output[root:])
        if match:
            return int(match[1])
    errors = []
    for path in (run_dir / "logs").glob("rank*.error"):
        found = re.fullmatch(r"rank(\d+)\.error", path.name)
        if found and path.stat().st_mtime >= since:
            errors.append((path.stat().st_mtime, int(found[1])))
    return min(errors)[1] if errors else None


def root_cause_signal(output: str) -> str | None:
    """The signal that killed the first failing rank, from torchrun's root-cause report
    (`exitcode  : -9 (pid: N)  (SIGKILL)`): a rank killed from outside writes no error."""
    root = output.rfind("Root Cause")
    if root < 0:
        return None
    match = re.search(r"exitcode\s*:\s*-\d+[^\n]*\((SIG[A-Z0-9]+)\)", output[root:])
    return match[1] if match else None


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    if not path.is_file():
        return ""
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - 64 * 1024))
        text = fh.read().decode("utf-8", errors="replace")
    text = text.replace("\r", "\n")
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


# --------------------------------------------------------------------------------------------
# The backend


class LocalBackend:
    name = "local"

    def __init__(self, grace_s: float = GRACE_S) -> None:
        self.grace_s = grace_s
        self._stop_signal: int | None = None

    def dryrun(self, plan: Plan) -> dict[str, str]:
        from launcher.config.render import render_launch_script

        return {
            "launch (a subprocess in its own process group, plan.env merged into the "
            "environment)": render_launch_script(plan.name, plan.env, plan.secrets, plan.launch)
        }

    def submit(self, plan: Plan, *, wait: bool = True) -> int:
        """Run the launch in the foreground (the local backend always waits)."""
        return self._run(plan, Path(plan.run_dir))

    def _run(self, plan: Plan, run_dir: Path) -> int:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        (run_dir / CANCEL_FILE).unlink(missing_ok=True)
        env = {**os.environ, **plan.env}
        record = JobRecord(
            backend="local",
            job_id=uuid.uuid4().hex[:12],
            state="RUNNING",
            extra={"host": socket.gethostname(), "launcher_pid": os.getpid(), "attempt": 0},
        )
        attempts = 1 + plan.recipe.train.restarts
        previous = {signal.SIGINT: signal.getsignal(signal.SIGINT)}
        previous[signal.SIGTERM] = signal.getsignal(signal.SIGTERM)
        self._stop_signal = None

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self._stop_signal = signum

        handle_signals = threading.current_thread() is threading.main_thread()
        if handle_signals:
            signal.signal(signal.SIGINT, on_signal)
            signal.signal(signal.SIGTERM, on_signal)
        try:
            for attempt in range(1, attempts + 1):
                started = time.time()
                code, output = self._launch_once(plan, env, record, attempt, run_dir)
                if code == 0:
                    record.state, record.error = "COMPLETED", None
                    record.save(run_dir)
                    return 0
                if self._stop_signal is not None or (run_dir / CANCEL_FILE).exists():
                    record.state, record.error = "CANCELLED", "stopped by a signal or cancel"
                    record.save(run_dir)
                    print(
                        f"training stopped; resume it by running the same command again "
                        f"(run dir {run_dir})",
                        file=sys.stderr,
                    )
                    return 130 if self._stop_signal == signal.SIGINT else 1
                rank = failing_rank(run_dir, output, started)
                where = f"rank {rank}" if rank is not None else "the launcher"
                killed = root_cause_signal(output)
                how = f"killed by {killed}, " if killed else ""
                record.error = f"{where} failed ({how}exit code {code}) on attempt {attempt}"
                if attempt < attempts:
                    log.warning(
                        "%s; restarting from the last complete checkpoint (restart %d of %d)",
                        record.error,
                        attempt,
                        attempts - 1,
                    )
                    record.save(run_dir)
                    continue
                record.state = "FAILED"
                record.save(run_dir)
                log_path = run_dir / "logs" / f"rank{rank if rank is not None else 0}.log"
                lines = tail(log_path) or tail(run_dir / "logs" / "launcher.log")
                print(
                    f"error: training failed: {record.error}\n--- last lines of {log_path}:\n"
                    f"{lines}\n---\nfull logs: tune-launch logs {run_dir} --rank "
                    f"{rank if rank is not None else 0}",
                    file=sys.stderr,
                )
                return 1
            return 1
        finally:
            if handle_signals:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)

    def _launch_once(
        self, plan: Plan, env: dict[str, str], record: JobRecord, attempt: int, run_dir: Path
    ) -> tuple[int, str]:
        import subprocess

        argv = list(plan.launch)
        log.info("launch (attempt %d): %s", attempt, shlex.join(argv))
        launcher_log = (run_dir / "logs" / "launcher.log").open("ab")
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: signals reach every rank
        )
        record.pids = [proc.pid]
        record.extra |= {"pgid": proc.pid, "attempt": attempt, "started": time.time()}
        record.save(run_dir)
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        kept = bytearray()
        out = getattr(sys.stderr, "buffer", None)
        kill_at: float | None = None
        try:
            while True:
                if self._stop_signal is not None and kill_at is None:
                    log.warning(
                        "stopping the run (signal %d): SIGTERM to its processes", self._stop_signal
                    )
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGTERM)
                    kill_at = time.monotonic() + self.grace_s
                if kill_at is not None and time.monotonic() > kill_at:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    kill_at = float("inf")
                ready, _, _ = select.select([fd], [], [], 0.5)
                if not ready:
                    if proc.poll() is not None and not _group_alive(proc.pid):
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
            if proc.poll() is None or _group_alive(proc.pid):
                stop_group(proc.pid, self.grace_s)
                proc.wait()
            launcher_log.close()
        return code, kept.decode("utf-8", errors="replace")

    # ---- from the run directory alone

    def status(self, run_dir: Path) -> JobRecord:
        record = JobRecord.load(Path(run_dir))
        if record is None:
            return JobRecord(backend="local", job_id="", state="UNKNOWN", error="no job.json")
        same_host = record.extra.get("host") == socket.gethostname()
        launcher = record.extra.get("launcher_pid")
        if record.state == "RUNNING" and same_host and launcher and not _alive(int(launcher)):
            pgid = record.extra.get("pgid")
            if not (pgid and _group_alive(int(pgid))):
                record.state = "FAILED"
                record.error = "the launcher process is gone (killed?) and left no result"
        return record

    def cancel(self, run_dir: Path) -> None:
        run_dir = Path(run_dir)
        record = JobRecord.load(run_dir)
        if record is None or record.backend != "local":
            raise RunError(f"no local job recorded in {run_dir}/job.json")
        (run_dir / CANCEL_FILE).write_text(str(os.getpid()))
        pgid = record.extra.get("pgid")
        if record.state == "RUNNING" and pgid and _group_alive(int(pgid)):
            stop_group(int(pgid), self.grace_s)
        launcher = record.extra.get("launcher_pid")
        if not (launcher and _alive(int(launcher))):
            record.state, record.error = "CANCELLED", "cancelled"
            record.save(run_dir)

    def logs(self, run_dir: Path, rank: int, follow: bool) -> Iterator[str]:
        path = Path(run_dir) / "logs" / f"rank{rank}.log"
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
