"""train.loss_watchdog_threshold: stop a run whose training loss stays too high (axolotl's
loss watchdog), instead of training on and merging a diverged model.

Each rank sees the same logged loss (the Trainer averages it over the ranks before logging),
so every rank stops at the same step: the run fails naming it, the last complete checkpoint
is kept as it was, and nothing is merged or served. Counted per logged loss: with
train.logging_steps 1, as in axolotl's examples, that is per step, as axolotl counts.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from launcher.rundir import RunDir


class LossDiverged(RuntimeError):
    """The logged loss stayed above train.loss_watchdog_threshold."""


class LossWatchdog(TrainerCallback):
    def __init__(self, run: RunDir, threshold: float, patience: int) -> None:
        self.run = run
        self.threshold = threshold
        self.patience = patience
        self.violations = 0

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        if loss <= self.threshold:
            self.violations = 0
            return
        self.violations += 1
        if self.violations < self.patience:
            return
        last = self.run.last_complete_checkpoint()
        where = f"the last checkpoint is {last.path} (kept)" if last else "no checkpoint yet"
        raise LossDiverged(
            f"loss {loss:.4g} above train.loss_watchdog_threshold={self.threshold} for "
            f"{self.violations} logged steps in a row, at step {state.global_step}: training "
            f"stopped, nothing merged; {where}. Hint: lower train.learning_rate or check the "
            "data; rerun in the same run directory to resume."
        )
