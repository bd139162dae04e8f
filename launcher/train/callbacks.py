"""What the run adds to the transformers / TRL trainers: metrics, the non-finite-loss policy,
atomic checkpoints, the token count. The training loop itself stays theirs.

- MetricsCallback: rank 0 appends one JSON line per log event to RUN_DIR/metrics.jsonl
  (loss, learning_rate, grad_norm, tokens_per_s, eval_loss, epoch, time, total_steps,
  elapsed_s, eta_s, on a GPU peak_memory_gib, on a CPU host peak_rss_gib, and any other
  metric the trainer logs), shows one progress line per log (launcher/train/progress.py) in
  the terminal and its log, and writes the raw record to its log only.
- trainer_class's trainers drop transformers' tqdm bar and printed log dicts: the progress
  line replaces them in the terminal; the raw values stay in the rank's log.
- trainer_class(base, hooks): a subclass of the given trainer class whose `_save_checkpoint`
  is atomic (launcher/train/checkpoint.py) and whose `compute_loss` applies train.nan_policy
  (RunHooks.finite_loss).

Nothing here adds a collective to a micro-batch: the non-finite check is local to the rank
(a rank that stops is a failed rank, and the launcher stops the others), and the token count
behind tokens_per_s is summed locally and all-reduced once per logging step, next to the
Trainer's own loss gather. On the quickstart model a step is ~40 ms and every gloo collective
~1 ms, so per-micro-batch collectives showed up as 10-30% of the throughput
(docs/benchmarks.md).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from launcher.rundir import RunDir
from launcher.train import checkpoint, faults
from launcher.train.progress import progress_line

log = logging.getLogger(__name__)
metrics_log = logging.getLogger("metrics")  # the log file only: the progress line shows them
progress_log = logging.getLogger("launcher.train.progress")  # the terminal and the log file

CONTRACT_KEYS = (
    "step",
    "loss",
    "learning_rate",
    "grad_norm",
    "tokens_per_s",
    "eval_loss",
    "epoch",
    "time",
)


class NonFiniteLoss(RuntimeError):
    """train.nan_policy=stop and the loss was NaN or infinite."""


class MetricsCallback(TrainerCallback):
    def __init__(self, run: RunDir) -> None:
        self.run = run
        self._last: tuple[float, int] | None = None
        self._began: tuple[float, int] = (time.monotonic(), 0)  # when, from which step

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._last = (time.monotonic(), state.num_input_tokens_seen or 0)
        self._began = (time.monotonic(), state.global_step)
        if state.is_world_process_zero:
            self.rewind(state.global_step)

    def rewind(self, step: int) -> None:
        """Drop the records after `step` (the step this run starts from: 0, or the resumed
        checkpoint's), and a torn last line: the steps an interrupted run logged after its
        last complete checkpoint are trained again, and must appear once."""
        path = self.run.metrics_file
        if not path.is_file():
            return
        lines = [x for x in path.read_text(encoding="utf-8", errors="replace").splitlines() if x]
        kept = [r for r in self.run.metrics() if _logged_by(r, step)]
        if len(kept) < len(lines):
            RunDir.write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
            log.info(
                "metrics.jsonl: dropped %d record(s) logged after step %d",
                len(lines) - len(kept),
                step,
            )

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record: dict[str, Any] = {key: None for key in CONTRACT_KEYS}
        record.update({k: v for k, v in logs.items() if isinstance(v, int | float | str | None)})
        record["step"] = state.global_step
        record["time"] = time.time()
        record |= _timing(self._began, state.global_step, state.max_steps)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            # rank 0's device; what launcher/config/memory.py's per-GPU estimate is compared with
            record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        else:
            record["peak_rss_gib"] = _peak_rss_gib()
        if "loss" in logs and self._last is not None:
            now, tokens = time.monotonic(), state.num_input_tokens_seen or 0
            elapsed = now - self._last[0]
            if elapsed > 0 and tokens:
                record["tokens_per_s"] = round((tokens - self._last[1]) / elapsed, 1)
            self._last = (now, tokens)
        with self.run.metrics_file.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        shown = {
            k: (f"{v:.4g}" if isinstance(v, float) else v)
            for k, v in record.items()
            if v is not None and k not in ("time", "step")
        }
        metrics_log.info("step %d/%d %s", state.global_step, state.max_steps, shown)
        line = progress_line(record)
        if line:
            progress_log.info(line)


def _timing(began: tuple[float, int], step: int, total: int) -> dict[str, Any]:
    """total_steps, elapsed_s (since this process began training) and eta_s (at the pace of
    the steps this process trained)."""
    elapsed = time.monotonic() - began[0]
    done = step - began[1]
    eta = elapsed / done * max(0, total - step) if done > 0 and total else None
    return {
        "total_steps": total or None,
        "elapsed_s": round(elapsed, 1),
        "eta_s": round(eta, 1) if eta is not None else None,
    }


def _peak_rss_gib() -> float:
    """This rank's peak resident memory (Linux reports ru_maxrss in KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def _logged_by(record: dict[str, Any], step: int) -> bool:
    try:
        return int(record.get("step") or 0) <= step
    except (TypeError, ValueError):
        return False


@dataclass
class RunHooks:
    """What the trainer subclass needs from the run, and the NaN policy's state."""

    run: RunDir
    nan_policy: str  # stop | skip
    keep_last: int
    rank: int
    resumed_from: Path | None = None
    # SFT: the loss is transformers' Trainer.compute_loss (the model's own cross-entropy on the
    # labels TRL's collator built), not TRL's fused LM head (see trainer_class)
    model_loss: bool = False
    skipped: int = 0
    max_consecutive_skips: int = 10
    samples: Any = None  # launcher/train/samples.py SampleLog, with train.log_samples
    zeroing: bool = False  # the current micro-batch's gradients are being replaced by zeros
    hooked: bool = False
    _consecutive: int = field(default=0, repr=False)

    def finite_loss(self, model: Any, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The micro-batch's loss under train.nan_policy: itself when finite; else
        NonFiniteLoss (stop), or a zero loss whose gradients the zeroing hooks replace by
        zeros (skip). This rank's decision: a rank that stops fails, and the launcher stops
        the others (launcher/train/entry.py's rank{N}.error, cluster/); a skipped micro-batch
        zeroes only this rank's gradients."""
        self.zeroing = False  # the previous micro-batch's backward is done
        if self.nan_policy == "skip" and not self.hooked:
            _install_zeroing_hooks(model, self)
        loss = faults.point("loss", step, self.run, self.rank, loss)
        if bool(torch.isfinite(loss.detach()).all()):
            self._consecutive = 0
            return loss
        last = self.run.last_complete_checkpoint()
        where = (
            f"the last good checkpoint is {last.path}" if last else "no checkpoint was written yet"
        )
        if self.nan_policy == "stop":
            raise NonFiniteLoss(
                f"non-finite loss ({loss.detach().float().item()}) at step {step}; {where} "
                "(kept, not overwritten). Hint: lower train.learning_rate, check the data for "
                "broken rows, use train.precision=bf16 instead of fp16, or set "
                "train.nan_policy=skip to skip such steps; rerun in the same run directory to "
                "resume."
            )
        self.skipped += 1
        self._consecutive += 1
        if self._consecutive > self.max_consecutive_skips:
            raise NonFiniteLoss(
                f"non-finite loss for {self._consecutive} micro-batches in a row at step "
                f"{step}; {where}. Hint: lower train.learning_rate or check the data."
            )
        log.warning(
            "non-finite loss at step %d: micro-batch skipped (zero gradients), %d so far",
            step,
            self.skipped,
        )
        self.zeroing = True
        return torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)


def tokens_in(inputs: Any) -> torch.Tensor | None:
    """The batch's non-padding tokens (a tensor on the batch's device: adding it up costs no
    synchronisation)."""
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        return mask.sum()
    ids = inputs.get("input_ids")
    return torch.tensor(ids.numel(), device=ids.device) if isinstance(ids, torch.Tensor) else None


def _install_zeroing_hooks(model: Any, hooks: RunHooks) -> None:
    """A gradient hook on every trainable parameter that returns zeros while a micro-batch is
    being skipped. Tensor hooks run before DDP / ZeRO reduce the gradient, so the step's
    collectives still run on every rank, with exact zeros from the skipped micro-batch."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(grad) if hooks.zeroing else grad

    for param in model.parameters():
        if param.requires_grad:
            param.register_hook(hook)
    hooks.hooked = True


def trainer_class(base: type, hooks: RunHooks) -> type:
    """base (Trainer, SFTTrainer, DPOTrainer) with atomic checkpoints, the NaN policy and a
    token count that costs one all-reduce per log."""
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    # SFT: the model's own loss, through transformers' Trainer (what a plain Trainer script
    # computes and what launcher/config/memory.py models). TRL's fused LM head saves the
    # logits' memory but its tiled kernel and four metric gathers per micro-batch cost ~30% of
    # a quickstart step; the loss is the same (tests/train/test_sft_loss.py).
    loss_of: Any = Trainer if hooks.model_loss else base

    class Tuned(base):
        _staging: str | None = None
        _tokens: torch.Tensor | None = None  # this rank's tokens since the last log

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # MetricsCallback's progress line replaces the tqdm bar and the printed dicts
            for quiet in (ProgressCallback, PrinterCallback):
                self.remove_callback(quiet)

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            # every rank calls log() for a training-loss log (right after the Trainer's own
            # loss gather), so the token count is summed over the ranks here, once per log
            if "loss" in logs and self._tokens is not None:
                total = self.accelerator.reduce(self._tokens.detach().clone(), reduction="sum")
                self.state.num_input_tokens_seen += int(total.item())
                logs["num_input_tokens_seen"] = self.state.num_input_tokens_seen
                self._tokens = None
            super().log(logs, start_time)

        def _get_output_dir(self, trial: Any) -> str:
            return self._staging or super()._get_output_dir(trial)

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            def write() -> None:  # the Trainer's own save, into RUN_DIR/checkpoints/.staging
                self._staging = str(hooks.run.staging)
                try:
                    super(Tuned, self)._save_checkpoint(model, trial)
                finally:
                    self._staging = None

            protect = {hooks.resumed_from} if hooks.resumed_from else set()
            checkpoint.save_atomically(
                self, write, run=hooks.run, keep_last=hooks.keep_last, protect=protect
            )

        def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
            faults.point("saving", self.state.global_step, hooks.run, hooks.rank)
            super()._save_optimizer_and_scheduler(output_dir)

        def compute_loss(
            self,
            model: Any,
            inputs: Any,
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            result: Any = loss_of.compute_loss(
                self,
                model,
                inputs,
                return_outputs=return_outputs,
                num_items_in_batch=num_items_in_batch,
            )
            if not model.training:
                return result
            if hooks.samples is not None:
                hooks.samples.record(self.state.global_step + 1, inputs)
            tokens = tokens_in(inputs)
            if tokens is not None:
                self._tokens = tokens if self._tokens is None else self._tokens + tokens
            loss = result[0] if return_outputs else result
            loss = hooks.finite_loss(model, loss, self.state.global_step + 1)
            return (loss, *result[1:]) if return_outputs else loss

    Tuned.__name__ = Tuned.__qualname__ = f"TuneLaunch{base.__name__}"
    return Tuned
