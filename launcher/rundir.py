"""RunDir: the one owner of the run directory. Every path and marker name, the lock, atomic
publishing and the metrics reader live here; every other module asks a RunDir.

Layout (everything a later stage needs is read back from here):
    RUN_DIR/recipe.yaml        the resolved recipe (absolute paths, overrides applied)
    RUN_DIR/plan.json          the frozen plan: the only thing ranks read
    RUN_DIR/accelerate.yaml    accelerate config
    RUN_DIR/deepspeed.json     DeepSpeed config (ZeRO strategies only)
    RUN_DIR/launch.sh          the per-node launch command, as a script
    RUN_DIR/versions.json      package versions and the git SHA
    RUN_DIR/job.json           backend, job id / pids (cluster/base.py JobRecord)
    RUN_DIR/request.txt        the launch request the backend submitted (what --dry-run prints)
    RUN_DIR/endpoint.json      the endpoint of `tune-launch serve --backend slurm` (job, node, URL)
    RUN_DIR/metrics.jsonl      rank 0: one JSON object per log event
    RUN_DIR/data_report.json   rank 0: what data validation found in each source
    RUN_DIR/train_facts.json   rank 0: parameters (trainable, total) and rows as trained
    RUN_DIR/eval_classification.json  rank 0: validation accuracy and F1 (classification)
    RUN_DIR/tb/                TensorBoard event files
    RUN_DIR/wandb/             W&B's run files (train.trackers wandb; offline: `wandb sync` them)
    RUN_DIR/mlflow.db          MLflow's tracking store (train.trackers mlflow, default URI)
    RUN_DIR/PREEMPTED          {"step": N}: the job saved on its signal and should be requeued
    RUN_DIR/.lock              held by whoever works in the directory (pipeline, merge, eval)
    RUN_DIR/slurm/             submitit's folder: sbatch script, pickles, per-task logs, errors
    RUN_DIR/base/              a tiny base model, when model.name_or_path is tiny:<arch>
    RUN_DIR/checkpoints/       checkpoint-<step>/ (COMPLETE when whole; plan.json: the plan it
                               was trained under), .staging/
    RUN_DIR/final/             the trained adapter or full model (COMPLETE), staged in .final.tmp
    RUN_DIR/merged/            the merged model (COMPLETE), staged in merged.tmp
    RUN_DIR/data_cache/        the splits as Arrow files while training
    RUN_DIR/logs/              rank{N}.log, rank{N}.error, launcher.log, merge.log, server*.log,
                               samples-rank{N}.jsonl (train.log_samples),
                               fault-*.fired (tests: launcher/train/faults.py)
    RUN_DIR/eval/              report.md, results.json, plots (NAME.png), lm_eval/
    RUN_DIR/export/FORMAT/     `tune-launch export`: gguf/ or int4/ files + validation.json
                               (COMPLETE), staged in export/.FORMAT.tmp
    RUN_DIR/.cache/            caches of the vLLM servers started for the run

A directory is complete when it carries the COMPLETE marker, written last (after an fsync of
its contents) and published by one rename: a crash leaves the previous one intact.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from launcher.errors import RunError

if TYPE_CHECKING:
    from launcher.config.plan import Plan

COMPLETE = "COMPLETE"
TRAIN_CONTRACT = "train_contract.json"  # in final/ and every checkpoint: what serving reproduces
CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    complete: bool


class RunDir:
    """RUN_DIR and everything in it. Cheap to build; holds no state but the path."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ---------------------------------------------------------------------------- files
    @property
    def recipe_file(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def plan_file(self) -> Path:
        return self.path / "plan.json"

    @property
    def accelerate_file(self) -> Path:
        return self.path / "accelerate.yaml"

    @property
    def deepspeed_file(self) -> Path:
        return self.path / "deepspeed.json"

    @property
    def launch_script(self) -> Path:
        return self.path / "launch.sh"

    @property
    def versions_file(self) -> Path:
        return self.path / "versions.json"

    @property
    def job_file(self) -> Path:
        return self.path / "job.json"

    @property
    def request_file(self) -> Path:
        """The launch request as submitted, printed as `--dry-run` prints it (cluster/)."""
        return self.path / "request.txt"

    @property
    def endpoint_file(self) -> Path:
        """The standing SLURM endpoint: job id, node, address, port, URL (cluster/endpoint.py)."""
        return self.path / "endpoint.json"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def train_facts_file(self) -> Path:
        """rank 0: trainable and total parameters, train and validation rows, as trained."""
        return self.path / "train_facts.json"

    @property
    def data_report_file(self) -> Path:
        return self.path / "data_report.json"

    @property
    def classification_eval_file(self) -> Path:
        return self.path / "eval_classification.json"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tb"

    @property
    def wandb(self) -> Path:
        """W&B's files: W&B writes into a wandb/ folder of its WANDB_DIR, the run directory."""
        return self.path / "wandb"

    @property
    def mlflow_db(self) -> Path:
        return self.path / "mlflow.db"

    @property
    def preempted_marker(self) -> Path:
        return self.path / "PREEMPTED"

    @property
    def cancel_file(self) -> Path:
        return self.path / ".cancel"

    @property
    def lock_file(self) -> Path:
        return self.path / ".lock"

    # ---------------------------------------------------------------------------- folders
    @property
    def base(self) -> Path:
        return self.path / "base"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def staging(self) -> Path:
        """Where a checkpoint is written before its rename into checkpoints/."""
        return self.checkpoints / ".staging"

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def final_staging(self) -> Path:
        return self.path / ".final.tmp"

    @property
    def merged(self) -> Path:
        return self.path / "merged"

    @property
    def merged_staging(self) -> Path:
        return self.path / "merged.tmp"

    @property
    def data_cache(self) -> Path:
        return self.path / "data_cache"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def eval(self) -> Path:
        return self.path / "eval"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"{CHECKPOINT_PREFIX}{step}"

    def list_checkpoints(self) -> list[Checkpoint]:
        """checkpoints/checkpoint-<step> directories, oldest first, complete or not."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for child in self.checkpoints.iterdir():
            match = _CHECKPOINT_RE.match(child.name)
            if match and child.is_dir():
                found.append(Checkpoint(int(match[1]), child, self.is_complete(child)))
        return sorted(found, key=lambda c: c.step)

    def last_complete_checkpoint(self) -> Checkpoint | None:
        complete = [c for c in self.list_checkpoints() if c.complete]
        return complete[-1] if complete else None

    def rank_log(self, rank: int) -> Path:
        return self.logs / f"rank{rank}.log"

    def samples_log(self, rank: int) -> Path:
        """train.log_samples: the rows each optimizer step used on this rank."""
        return self.logs / f"samples-rank{rank}.jsonl"

    def samples_logs(self) -> list[Path]:
        return sorted(self.logs.glob("samples-rank*.jsonl")) if self.logs.is_dir() else []

    @staticmethod
    def checkpoint_plan(checkpoint: Path) -> Path:
        """The plan a checkpoint was trained under (what a resume is compared with)."""
        return checkpoint / "plan.json"

    def reset_training(self) -> list[Path]:
        """--restart: delete what training, merge and eval wrote (checkpoints, final,
        merged, eval, metrics and trackers' files, sample logs, the data cache); returns what
        was removed."""
        doomed = [self.checkpoints, self.final, self.final_staging, self.merged]
        doomed += [self.merged_staging, self.eval, self.data_cache, self.tensorboard, self.wandb]
        removed = []
        for directory in doomed:
            if directory.exists():
                RunDir.remove(directory)
                removed.append(directory)
        for file in [
            self.metrics_file,
            self.preempted_marker,
            self.mlflow_db,
            *self.samples_logs(),
        ]:
            if file.exists():
                file.unlink()
                removed.append(file)
        return removed

    def rank_error(self, rank: int) -> Path:
        """Written by a rank that fails: its traceback (launcher/train/entry.py)."""
        return self.logs / f"rank{rank}.error"

    def rank_errors(self) -> dict[int, Path]:
        """The error files the ranks left, by rank."""
        found = {}
        for path in self.logs.glob("rank*.error"):
            match = re.fullmatch(r"rank(\d+)\.error", path.name)
            if match:
                found[int(match[1])] = path
        return dict(sorted(found.items()))

    @property
    def slurm(self) -> Path:
        """submitit's folder: the sbatch script, the task's pickles, per-task stdout/stderr."""
        return self.path / "slurm"

    def node_error(self, job_id: str, node_rank: int) -> Path:
        """Written by a SLURM node task whose launcher failed (cluster/node_entry.py)."""
        return self.slurm / f"{job_id}_{node_rank}_error.json"

    def node_errors(self, job_id: str) -> list[Path]:
        return sorted(self.slurm.glob(f"{job_id}_*_error.json"))

    def fault_flag(self, kind: str, step: int, rank: int) -> Path:
        """Tests only: the injected fault `kind` at `step` has fired on `rank`."""
        return self.logs / f"fault-{kind}-{step}-rank{rank}.fired"

    @property
    def launcher_log(self) -> Path:
        return self.logs / "launcher.log"

    @property
    def merge_log(self) -> Path:
        return self.logs / "merge.log"

    @property
    def server_log(self) -> Path:
        return self.logs / "server.log"

    def named_server_log(self, name: str) -> Path:
        """The log of one of several servers (eval starts one per model it serves)."""
        return self.logs / f"server-{name}.log"

    @property
    def cache(self) -> Path:
        """Caches of the servers started for this run (vLLM, torch inductor, temp files)."""
        return self.path / ".cache"

    @property
    def eval_results(self) -> Path:
        return self.eval / "results.json"

    @property
    def eval_report(self) -> Path:
        return self.eval / "report.md"

    def eval_plot(self, name: str) -> Path:
        return self.eval / f"{name}.png"

    def export(self, fmt: str) -> Path:
        """An export of the fine-tuned model (launcher/export/): RUN_DIR/export/FORMAT."""
        return self.path / "export" / fmt

    def export_staging(self, fmt: str) -> Path:
        return self.path / "export" / f".{fmt}.tmp"

    @property
    def lm_eval(self) -> Path:
        """lm-evaluation-harness's output and log."""
        return self.eval / "lm_eval"

    # ---------------------------------------------------------------------------- markers
    @staticmethod
    def contract_file(directory: Path) -> Path:
        """train_contract.json in a checkpoint, final/ or merged/."""
        return directory / TRAIN_CONTRACT

    @staticmethod
    def is_complete(directory: Path) -> bool:
        return (directory / COMPLETE).is_file()

    @staticmethod
    def read_marker(directory: Path) -> dict[str, Any] | None:
        """The COMPLETE marker's JSON, or None when the directory is not complete."""
        try:
            marker = json.loads((directory / COMPLETE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return marker if isinstance(marker, dict) else None

    @staticmethod
    def mark_complete(directory: Path, info: dict[str, Any]) -> None:
        """Write the COMPLETE marker, last, after the contents are on disk."""
        for child in directory.rglob("*"):
            if child.is_file():
                with child.open("rb") as fh:
                    os.fsync(fh.fileno())
        with (directory / COMPLETE).open("w", encoding="utf-8") as fh:
            json.dump({**info, "time": time.time()}, fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(directory)

    @classmethod
    def publish(cls, staged: Path, final: Path, info: dict[str, Any]) -> None:
        """Mark `staged` complete, then rename it into place; a stale `final` goes after."""
        cls.mark_complete(staged, info)
        if final.exists():
            cls.remove(final)
        os.replace(staged, final)
        _fsync_dir(final.parent)

    @staticmethod
    def remove(directory: Path) -> None:
        """Delete a directory, renamed first: a crash mid-delete never leaves a half-deleted
        directory under its name (one that may carry COMPLETE)."""
        doomed = directory.with_name(f".deleting-{directory.name}")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(directory, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    @staticmethod
    def write_atomic(path: Path, text: str) -> None:
        """Write a file by rename: readers see the old text or the new, never half."""
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)

    # ---------------------------------------------------------------------------- the lock
    @contextlib.contextmanager
    def lock(self, holder: str) -> Iterator[None]:
        """Hold RUN_DIR/.lock (fcntl, released with its holder, even on SIGKILL) while
        working in the directory; RunError naming the holder if another process has it.
        Taken once, by the outermost caller: the pipeline, `tune-launch merge` or
        `tune-launch eval`. (A SLURM job outlives it: the pipeline also refuses a run
        directory whose job.json names a live job.)"""
        if not self.path.is_dir():
            raise RunError(f"{self.path} does not exist: is it a run directory?")
        handle = _acquire(self.lock_file, self.path)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{holder}: pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
            yield
        finally:
            handle.close()  # closing releases the lock

    # ---------------------------------------------------------------------------- metrics
    def metrics(self) -> list[dict[str, Any]]:
        """metrics.jsonl's records (a torn last line is skipped); [] when there is none."""
        try:
            lines = self.metrics_file.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return []
        rows = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def last_step(self) -> int | None:
        steps = [int(r["step"]) for r in self.metrics() if r.get("step") is not None]
        return steps[-1] if steps else None

    # ---------------------------------------------------------------------------- plan
    def load_plan(self) -> Plan:
        from launcher.config.plan import Plan

        return Plan.model_validate_json(self.plan_file.read_text(encoding="utf-8"))

    def has_plan(self) -> bool:
        return self.plan_file.is_file()


def _acquire(path: Path, run_dir: Path) -> IO[str]:
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunError(
            f"{run_dir} is in use by {holder}: wait for it, stop it with "
            f"`tune-launch cancel {run_dir}`, or choose another --run-dir"
        ) from None
    return handle


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -------------------------------------------------------------------------------------------
# Writing the plan's files
