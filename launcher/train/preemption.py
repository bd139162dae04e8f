"""Save on the time-limit / preemption signal, then stop cleanly so the job can be requeued.

When TUNE_LAUNCH_SAVE_SIGNAL names a signal (the SLURM node task sets SIGUSR2: submitit's
signal before the time limit, or a preemption), every rank installs a handler that only sets
a flag. At each optimizer step's end the ranks agree on the flag (all-reduce MAX, so all stop
at the same step); then the Trainer saves a complete checkpoint and stops, and rank 0 writes
RUN_DIR/PREEMPTED {"step": N} (RunDir.preempted_marker, written by launcher/train/entry.py).
The requeued job resumes from that checkpoint: no optimizer step after the signal point is
lost.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from transformers import TrainerCallback

log = logging.getLogger(__name__)
ENV = "TUNE_LAUNCH_SAVE_SIGNAL"  # a per-process fact: set by the SLURM node task


class SaveOnSignal(TrainerCallback):
    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: int | None = None
        name = os.environ.get(ENV, "")
        self.enabled = bool(name)
        if self.enabled:
            signal.signal(getattr(signal, name), self._on_signal)
            log.info("saving a checkpoint and stopping on %s", name)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.requested = True

    def _agreed(self) -> bool:
        import torch.distributed as dist

        from launcher.train.preflight import any_rank

        nccl = dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl"
        return any_rank(self.requested, "cuda" if nccl else "cpu")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.enabled and self._agreed():
            log.warning("save signal received: checkpoint at step %d, then stop", state.global_step)
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control
