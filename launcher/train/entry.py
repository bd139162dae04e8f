"""The per-rank entrypoint: `python -m launcher.train RUN_DIR`, started by torchrun or
accelerate on every rank of every node. It reads RUN_DIR/plan.json and nothing else.

Top to bottom: logging -> pre-flight all-reduce -> base model (rank 0 builds a tiny one if
missing) -> resume point -> tokenizer and data -> TrainingArguments -> model -> the TRL /
transformers trainer -> train -> RUN_DIR/final. The loop is the trainer's; what this run adds
(atomic checkpoints, metrics, the NaN policy) is in launcher/callbacks.py and checkpoint.py.
Only rank 0 writes shared files; every rank logs to RUN_DIR/logs/rank{N}.log.
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
from launcher.data import rows as data
from launcher.errors import RecipeError
from launcher.rundir import RunDir
from launcher.train import checkpoint

log = logging.getLogger("launcher.train")
DATA_CACHE = "data_cache"  # the splits as Arrow files and the trainer's tokenized caches
SFT_FORMATS = ("alpaca", "messages", "text")  # trained with TRL's SFTTrainer


# --------------------------------------------------------------------------------------------
# Process setup


def setup_logging(run_dir: Path, rank: int) -> Path:
    """Every rank logs to logs/rank{N}.log; rank 0 also to the terminal. Other ranks' stdout
    and stderr (prints, C extensions, tracebacks) go to their log file, not the terminal."""
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"rank{rank}.log"
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


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shared_dataset(run_dir: Path, name: str, rows: list[dict[str, Any]], main: bool) -> Any:
    """The split as an Arrow file in RUN_DIR/data_cache/NAME, written by rank 0 and memory-mapped
    by every rank. TRL tokenizes on the main process first and the others then find its cached
    result on disk: the data is tokenized once, not once per rank one after the other (as for
    an in-memory dataset), and no rank holds the tokenized data in RAM."""
    import datasets

    if not rows:
        return None
    path = run_dir / DATA_CACHE / name
    if main:
        shutil.rmtree(path, ignore_errors=True)  # a previous attempt's files and caches
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    barrier()
    return datasets.load_from_disk(str(path))


# --------------------------------------------------------------------------------------------
# Trainer arguments


def training_args(plan: Plan, run_dir: Path, *, has_eval: bool) -> Any:
    """SFTConfig / DPOConfig / TrainingArguments from the plan. Precision flags equal the
    DeepSpeed JSON's (HF refuses a mismatch); on CPU hosts, the CPU with gloo."""
    recipe, t = plan.recipe, plan.recipe.train
    fmt = recipe.data.format
    eval_steps = t.eval_steps or t.save_steps
    common: dict[str, Any] = {
        "output_dir": str(checkpoint.checkpoints_dir(run_dir)),
        "per_device_train_batch_size": plan.micro_batch_size,
        "per_device_eval_batch_size": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "num_train_epochs": t.epochs,
        "max_steps": t.max_steps or -1,
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler,
        "warmup_steps": t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "optim": t.optimizer,
        "bf16": t.precision == "bf16",
        "fp16": t.precision == "fp16",
        "gradient_checkpointing": t.gradient_checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False}
        if t.gradient_checkpointing
        else None,
        "seed": t.seed,
        "data_seed": t.seed,
        "logging_steps": t.logging_steps,
        "logging_first_step": True,
        "save_strategy": "steps",
        "save_steps": t.save_steps,
        "save_total_limit": None,  # pruning is ours: only complete checkpoints count
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": eval_steps if has_eval else None,
        "report_to": ["tensorboard"],
        # counted by launcher/callbacks.py, one all-reduce per log (the Trainer's count
        # gathers every micro-batch)
        "include_num_input_tokens_seen": "no",
        "log_level": "info",
        "log_level_replica": "warning",
        "deepspeed": plan.deepspeed_path,
        "ddp_timeout": recipe.distributed.nccl_timeout_s,
        "dataloader_num_workers": 0,
    }
    if not plan.on_gpu:
        common |= {"use_cpu": True, "ddp_backend": "gloo"}
    if t.early_stopping_patience and has_eval:
        common |= {"metric_for_best_model": "eval_loss", "greater_is_better": False}
    if fmt in SFT_FORMATS:
        from trl import SFTConfig

        flash = recipe.model.attn_implementation == "flash_attention_2"
        return SFTConfig(
            **common,
            max_length=recipe.data.max_seq_len,
            packing=recipe.data.packing,
            # best-fit packing is padding-free, which needs FlashAttention to keep examples apart
            packing_strategy="bfd" if flash else "wrapped",
            completion_only_loss=recipe.data.completion_only_loss if fmt != "text" else False,
            dataset_text_field="text",
            trust_remote_code=recipe.model.trust_remote_code,
        )
    if fmt == "preference":
        from trl import DPOConfig

        return DPOConfig(
            **common,
            beta=t.dpo_beta,
            max_length=recipe.data.max_seq_len,
            trust_remote_code=recipe.model.trust_remote_code,
        )
    from transformers import TrainingArguments

    return TrainingArguments(**common, label_names=["labels"])


def classification_metrics(prediction: Any) -> dict[str, float]:
    """Accuracy and macro F1 on the validation set."""
    import numpy as np

    logits, labels = prediction.predictions, prediction.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    predicted = np.asarray(logits).argmax(-1)
    labels = np.asarray(labels)
    f1s = []
    for label in np.unique(np.concatenate([labels, predicted])):
        tp = float(((predicted == label) & (labels == label)).sum())
        fp = float(((predicted == label) & (labels != label)).sum())
        fn = float(((predicted != label) & (labels == label)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": float((predicted == labels).mean()), "f1": float(np.mean(f1s))}


# --------------------------------------------------------------------------------------------
# The run


def train(plan: Plan, run_dir: Path, rank: int) -> None:
    import transformers

    from launcher.train import callbacks
    from launcher.train import model as modeling
    from launcher.train.preflight import run_preflight

    recipe = plan.recipe
    run_preflight(recipe.distributed.preflight_timeout_s, plan.on_gpu)
    if plan.deepspeed:
        import deepspeed

        # DeepSpeed's view of the group preflight formed (ZeRO-3 partitions weights at load)
        deepspeed.init_distributed(dist_backend="nccl" if plan.on_gpu else "gloo")
    main = rank == 0

    # the base model: tiny ones are built by the submitting host before any rank starts
    base = plan.base_model
    if plan.tiny_arch and not Path(base, "config.json").is_file():
        raise RuntimeError(f"{base} is missing: start runs with `tune-launch RECIPE`")

    # resume from the last complete checkpoint; partial ones are removed first
    ckpts = checkpoint.checkpoints_dir(run_dir)
    if main:
        for path in checkpoint.clean_partial(ckpts):
            log.warning("removed incomplete checkpoint %s", path)
    barrier()
    resume = checkpoint.last_complete(ckpts)
    if resume and main:
        log.info("resuming from %s (step %d)", resume.path, resume.step)

    # tokenizer (chat template, pad != EOS) and data (validated, split the same on every rank)
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        base, trust_remote_code=recipe.model.trust_remote_code
    )
    added_tokens = data.prepare_tokenizer(tokenizer, recipe)
    measure = data.length_fn(tokenizer, recipe.data)
    splits = data.load_splits(recipe, measure)
    if main:
        for report in splits.reports:
            log.info("data %s", report.summary())
        (run_dir / "data_report.json").write_text(
            json.dumps([r.to_dict() for r in splits.reports], indent=2)
        )
    train_ds = shared_dataset(run_dir, "train", splits.train, main)
    eval_ds = shared_dataset(run_dir, "validation", splits.validation, main)

    # arguments before the model: under ZeRO-3 they make from_pretrained partition the weights
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run_dir / "tb"))
    args = training_args(plan, run_dir, has_eval=eval_ds is not None)
    transformers.set_seed(recipe.train.seed)
    num_labels = len(splits.labels) if splits.labels else recipe.model.num_labels
    net = modeling.load_model(plan, base, num_labels=num_labels, labels=splits.labels)
    if added_tokens:
        net.resize_token_embeddings(len(tokenizer))
    net.config.pad_token_id = tokenizer.pad_token_id
    if getattr(net, "generation_config", None) is not None:
        net.generation_config.pad_token_id = tokenizer.pad_token_id
    lora = modeling.peft_config(plan, net)
    if modeling.uses_every_adapter(plan, net):
        args.ddp_find_unused_parameters = False

    def write_extras(path: Path) -> None:
        """Saved with every checkpoint and the final model: what serving must reproduce."""
        tokenizer.save_pretrained(path)
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        generation = getattr(unwrapped, "generation_config", None)
        if recipe.model.task == "causal_lm" and generation is not None:
            generation.save_pretrained(path)
        contract = data.train_contract(tokenizer, generation)
        (path / checkpoint.CONTRACT_FILE).write_text(json.dumps(contract, indent=2))

    hooks = callbacks.RunHooks(
        run_dir=run_dir,
        nan_policy=recipe.train.nan_policy,
        keep_last=recipe.train.keep_last,
        rank=rank,
        resumed_from=resume.path if resume else None,
        write_extras=write_extras,
        model_loss=recipe.data.format in SFT_FORMATS,
    )
    from launcher.train.preemption import MARKER, SaveOnSignal

    on_signal = SaveOnSignal()
    extra_callbacks: list[Any] = [callbacks.MetricsCallback(run_dir), on_signal]
    if recipe.train.early_stopping_patience and eval_ds is not None:
        extra_callbacks.append(
            transformers.EarlyStoppingCallback(recipe.train.early_stopping_patience)
        )

    fmt = recipe.data.format
    trainer: Any
    if fmt in (*SFT_FORMATS, "preference"):
        from trl import DPOTrainer, SFTTrainer

        trainer = callbacks.trainer_class(DPOTrainer if fmt == "preference" else SFTTrainer, hooks)(
            model=net,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            peft_config=lora,  # applied right after set_seed(args.seed): same adapter on every rank
            callbacks=extra_callbacks,
        )
    else:
        net = modeling.wrap_peft(net, lora, recipe.train.seed)
        if recipe.train.gradient_checkpointing and lora is not None:
            net.enable_input_require_grads()

        def tokenize(batch: dict[str, list[Any]]) -> Any:
            return tokenizer(batch["text"], truncation=True, max_length=recipe.data.max_seq_len)

        train_ds = train_ds.map(tokenize, batched=True, remove_columns=["text"])
        eval_ds = eval_ds.map(tokenize, batched=True, remove_columns=["text"]) if eval_ds else None
        trainer = callbacks.trainer_class(transformers.Trainer, hooks)(
            model=net,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            data_collator=transformers.DataCollatorWithPadding(tokenizer),
            compute_metrics=classification_metrics,
            callbacks=extra_callbacks,
        )
        # PeftModel.forward takes **kwargs, so the Trainer would believe the classifier
        # normalises its loss by num_items_in_batch; it does not (loss x accumulation x world)
        trainer.model_accepts_loss_kwargs = False
    if main:
        trainable, total = modeling.count_trainable(trainer.model)
        log.info(
            "training %s (%s, %s): %s of %s parameters trainable, %d train / %d validation rows",
            recipe.model.name_or_path,
            recipe.method.kind,
            recipe.distributed.strategy,
            f"{trainable:,}",
            f"{total:,}",
            len(train_ds),
            len(eval_ds) if eval_ds is not None else 0,
        )

    result = trainer.train(resume_from_checkpoint=str(resume.path) if resume else None)
    if main:
        log.info("training done at step %d: %s", trainer.state.global_step, result.metrics)
        if hooks.skipped:
            log.warning("%d micro-batches with a non-finite loss were skipped", hooks.skipped)
    if on_signal.stopped_at is not None:  # checkpointed for a requeue: no final/ yet
        if main:
            (run_dir / MARKER).write_text(json.dumps({"step": on_signal.stopped_at}))
            log.info("stopped at step %d for a requeue", on_signal.stopped_at)
        barrier()
        return
    if eval_ds is not None and fmt == "classification":
        metrics = trainer.evaluate()
        if main:
            log.info("validation: %s", {k: round(v, 4) for k, v in metrics.items()})
            (run_dir / "eval_classification.json").write_text(json.dumps(metrics, indent=2))
    checkpoint.save_final(
        trainer, run_dir, shard_size_gb=recipe.merge.shard_size_gb, extras=write_extras
    )
    if main:  # the tokenized copies can be as large as the data; an attempt rebuilds them
        shutil.rmtree(run_dir / DATA_CACHE, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m launcher.train RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(argv[0]).resolve()
    plan = RunDir(run_dir).load_plan()
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(run_dir, rank)
    code, failure = 0, ""
    try:
        train(plan, run_dir, rank)
    except RecipeError as exc:  # bad data found on the rank
        log.error("%s", exc.render())
        code, failure = 2, exc.render()
    except Exception as exc:
        failure = traceback.format_exc()
        log.error("training failed on rank %d: %s\n%s", rank, exc, failure)
        code = 1
    if code:
        error = run_dir / "logs" / f"rank{rank}.error"
        error.write_text(failure)
    logging.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
