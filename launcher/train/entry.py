"""The per-rank entrypoint: `python -m launcher.train RUN_DIR`, started by torchrun or
accelerate on every rank of every node. It reads RUN_DIR/plan.json and nothing else from the
submitting host; the launcher's per-process facts (RANK, LOCAL_RANK, WORLD_SIZE, the node
name, TUNE_LAUNCH_SAVE_SIGNAL) come from the environment.

Top to bottom (`train`): setup (the process group, the base model) -> resume point ->
tokenizer and data -> TrainingArguments -> model -> the TRL / transformers trainer -> train ->
finish (RUN_DIR/final, or RUN_DIR/PREEMPTED for a requeue). The loop is the trainer's; what
this run adds (atomic checkpoints, metrics, the NaN policy) is in launcher/train/callbacks.py
and checkpoint.py. Only rank 0 writes shared files; every rank logs to RUN_DIR/logs/rank{N}.log,
and a rank that fails writes its traceback to RUN_DIR/logs/rank{N}.error.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

from launcher.config.plan import Plan
from launcher.data.formats import get_format
from launcher.errors import RecipeError
from launcher.rundir import Checkpoint, RunDir
from launcher.train import tracking
from launcher.train.args import training_args
from launcher.train.data import load_data, load_tokenizer
from launcher.train.preflight import barrier, run_preflight

log = logging.getLogger("launcher.train")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m launcher.train RUN_DIR", file=sys.stderr)
        return 2
    run = RunDir(Path(argv[0]).resolve())
    plan = run.load_plan()
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(run, rank)
    code, failure = 0, ""
    try:
        train(plan, run, rank)
    except RecipeError as exc:  # bad data found on the rank
        log.error("%s", exc.render())
        code, failure = 2, exc.render()
    except Exception as exc:
        failure = traceback.format_exc()
        log.error("training failed on rank %d: %s\n%s", rank, exc, failure)
        code = 1
    if code:
        run.rank_error(rank).write_text(failure)
    logging.shutdown()
    return code


def train(plan: Plan, run: RunDir, rank: int) -> None:
    """One rank's run, top to bottom."""
    from launcher.train import callbacks
    from launcher.train import model as modeling
    from launcher.train import resume as resuming
    from launcher.train.preemption import SaveOnSignal
    from launcher.train.samples import SampleLog
    from launcher.train.trainers import build_trainer

    recipe, main = plan.recipe, rank == 0
    setup(plan, run)
    resume = resume_point(run, main)
    resuming.check_stream_position(plan, resume)  # a stream resumes within its first pass
    universal = resuming.prepare(plan, resume, main)  # another world size wrote it (ZeRO)
    tokenizer, added_tokens = load_tokenizer(plan)
    data = load_data(plan, run, tokenizer, main)
    # the arguments before the model: under ZeRO-3 they make from_pretrained partition it
    args = training_args(plan, run, has_eval=data.validation is not None, universal=universal)
    net, lora = modeling.build_model(plan, tokenizer, added_tokens, data)
    if recipe.train.ddp_find_unused_parameters is not None:  # rules: ddp only
        args.ddp_find_unused_parameters = recipe.train.ddp_find_unused_parameters
    elif modeling.uses_every_adapter(plan, net):
        args.ddp_find_unused_parameters = False

    hooks = callbacks.RunHooks(
        run=run,
        nan_policy=recipe.train.nan_policy,
        keep_last=recipe.train.keep_last,
        rank=rank,
        resumed_from=resume.path if resume else None,
        model_loss=get_format(recipe.data.format).trainer == "sft",
    )
    on_signal = SaveOnSignal()
    extra_callbacks: list[Any] = [callbacks.MetricsCallback(run), on_signal]
    rescale = resuming.schedule_callback(plan, resume)  # a resume with a new learning rate
    if rescale is not None:
        extra_callbacks.append(rescale)
    if universal:
        extra_callbacks.append(resuming.SeparateStepCounters())
    threshold = recipe.train.loss_watchdog_threshold
    if threshold is not None:
        from launcher.train.watchdog import LossWatchdog

        patience = recipe.train.loss_watchdog_patience
        extra_callbacks.append(LossWatchdog(run, threshold, patience))
    if recipe.train.early_stopping_patience and data.validation is not None:
        import transformers

        patience = recipe.train.early_stopping_patience
        extra_callbacks.append(transformers.EarlyStoppingCallback(patience))
    trainer = build_trainer(plan, net, lora, args, data, tokenizer, hooks, extra_callbacks)
    if recipe.train.log_samples:
        hooks.samples = SampleLog(run, rank, trainer.train_dataset)
    if main:
        log_start(plan, run, trainer, modeling.count_trainable(trainer.model))

    result = trainer.train(resume_from_checkpoint=str(resume.path) if resume else None)
    if main:
        log.info("training done at step %d: %s", trainer.state.global_step, result.metrics)
        if hooks.skipped:
            log.warning("%d micro-batches with a non-finite loss were skipped", hooks.skipped)
    if on_signal.stopped_at is not None:
        stop_for_requeue(run, on_signal.stopped_at, main)
    else:
        finish(plan, run, trainer, main)


# --------------------------------------------------------------------------------------------
# The steps


def setup(plan: Plan, run: RunDir) -> None:
    """The process group (pre-flight, and DeepSpeed's view of it: ZeRO-3 partitions weights
    at load), the trackers' settings, and a check that the base model is there."""
    run_preflight(plan)
    if plan.deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if plan.on_gpu else "gloo")
    tracking.apply(plan)  # the trackers' folders and names, from the plan
    # tiny bases are built by the submitting host before any rank starts (launcher/tiny.py)
    if plan.tiny_arch and not Path(plan.base_model, "config.json").is_file():
        raise RuntimeError(f"{plan.base_model} is missing: start runs with `tune-launch RECIPE`")


def resume_point(run: RunDir, main: bool) -> Checkpoint | None:
    """The last complete checkpoint; rank 0 first removes partial ones (a crash mid-save)
    and the sample-log lines of steps after it."""
    from launcher.train import checkpoint, samples

    if main:
        for path in checkpoint.clean_partial(run):
            log.warning("removed incomplete checkpoint %s", path)
        last = run.last_complete_checkpoint()
        samples.rewind(run, last.step if last else 0)
    barrier()
    resume = run.last_complete_checkpoint()
    if resume and main:
        log.info("resuming from %s (step %d)", resume.path, resume.step)
    return resume


def log_start(plan: Plan, run: RunDir, trainer: Any, trainable: tuple[int, int]) -> None:
    recipe, validation = plan.recipe, trainer.eval_dataset
    # a stream (data.streaming) has no length: its rows are not counted, and not said
    train_rows = len(trainer.train_dataset) if plan.stream is None else None
    facts = {
        "trainable_params": trainable[0],
        "total_params": trainable[1],
        "train_rows": train_rows,
        "validation_rows": len(validation) if validation is not None else 0,
    }
    RunDir.write_atomic(run.train_facts_file, json.dumps(facts, indent=2))
    log.info(
        "training %s (%s, %s): %s of %s parameters trainable, %s train / %d validation rows",
        recipe.model.name_or_path,
        recipe.method.kind,
        recipe.distributed.strategy,
        f"{trainable[0]:,}",
        f"{trainable[1]:,}",
        "streamed" if train_rows is None else train_rows,
        len(validation) if validation is not None else 0,
    )


def stop_for_requeue(run: RunDir, step: int, main: bool) -> None:
    """Checkpointed on the save signal: RUN_DIR/PREEMPTED tells the backend to requeue; no
    final/ yet."""
    if main:
        run.preempted_marker.write_text(json.dumps({"step": step}))
        log.info("stopped at step %d for a requeue", step)
    barrier()


def finish(plan: Plan, run: RunDir, trainer: Any, main: bool) -> None:
    """A classifier's validation scores, then RUN_DIR/final; the data cache goes."""
    from launcher.train import checkpoint

    classify = get_format(plan.recipe.data.format).trainer == "classification"
    if classify and trainer.eval_dataset is not None:
        metrics = trainer.evaluate()
        if main:
            log.info("validation: %s", {k: round(v, 4) for k, v in metrics.items()})
            run.classification_eval_file.write_text(json.dumps(metrics, indent=2))
    checkpoint.save_final(trainer, run, shard_size_gb=plan.recipe.merge.shard_size_gb)
    if main:  # the tokenized copies can be as large as the data; an attempt rebuilds them
        shutil.rmtree(run.data_cache, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Process setup


def setup_logging(run: RunDir, rank: int) -> Path:
    """Every rank logs to logs/rank{N}.log; rank 0 also to the terminal. Other ranks' stdout
    and stderr (prints, C extensions, tracebacks) go to their log file, not the terminal."""
    run.logs.mkdir(parents=True, exist_ok=True)
    path = run.rank_log(rank)
    if rank != 0:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    fmt = logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(fmt)
    handlers: list[logging.Handler] = [file_handler]
    if rank == 0:
        terminal = logging.StreamHandler(sys.stderr)
        terminal.setFormatter(logging.Formatter("[train] %(message)s"))
        terminal.setLevel(logging.INFO)
        # the terminal shows our own lines and errors; everything else is in the log file
        terminal.addFilter(lambda r: r.name.startswith("launcher") or r.levelno >= logging.ERROR)
        handlers.append(terminal)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in handlers:
        root.addHandler(handler)
    logging.captureWarnings(True)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_warning()
    hf = transformers.utils.logging
    hf.disable_default_handler()
    hf.enable_propagation()
    hf.set_verbosity_info() if rank == 0 else hf.set_verbosity_warning()
    return path


if __name__ == "__main__":
    sys.exit(main())
