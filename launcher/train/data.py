"""The rank's data: the tokenizer, and the validated splits as Arrow files every rank shares.

Rank 0 reads, validates, converts, tokenizes and splits the recipe's data in one pass through
`datasets` (launcher/data/prepare.py: the checks of launcher/data/rows.py, conversations with a
loss mask over their assistant turns as launcher/data/turns.py makes it) into
RUN_DIR/data_cache, and every rank memory-maps the result; with data.streaming (the plan's
`stream`) rank 0 prepares only the validation sources and every rank opens the training
stream itself (launcher/data/stream.py). Only rank 0 logs the data report and writes
RUN_DIR/data_report.json.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from launcher.config.plan import Plan
from launcher.data import rows
from launcher.rundir import RunDir
from launcher.train.preflight import any_rank, barrier

log = logging.getLogger("launcher.train")


@dataclass
class RankData:
    train: Any  # datasets.Dataset: the trainer's rows (an IterableDataset for data.streaming)
    validation: Any  # datasets.Dataset, or None without validation rows
    labels: dict[str, int] | None  # string label -> id (classification with string labels)
    num_labels: int | None  # the classifier's outputs (classification)


def load_tokenizer(plan: Plan) -> tuple[Any, bool]:
    """The base model's tokenizer with the chat template and a pad token distinct from EOS;
    True when a token was added (the model's embeddings must then be resized)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(
        plan.base_model, trust_remote_code=plan.recipe.model.trust_remote_code
    )
    return tokenizer, rows.prepare_tokenizer(tokenizer, plan.recipe)


def load_data(plan: Plan, run: RunDir, tokenizer: Any, main: bool) -> RankData:
    """The recipe's data, validated (RecipeError per data.invalid_rows), tokenized and split
    by rank 0 in one pass (launcher/data/prepare.py) into RUN_DIR/data_cache, which every rank
    then memory-maps. The other ranks wait for it (as TRL's main-process-first preparation
    does) and stop when rank 0 could not prepare the data."""
    from launcher.data.prepare import prepare_splits
    from launcher.data.stream import prepare_streamed, train_stream

    barrier()  # every rank past a previous attempt's data_cache before rank 0 replaces it
    failed: Exception | None = None
    if main:
        try:
            if plan.stream is not None:  # the validation only: each rank opens the stream
                prepared = prepare_streamed(plan.recipe, tokenizer, run.data_cache, plan.stream)
            else:
                prepared = prepare_splits(plan.recipe, tokenizer, run.data_cache)
            fate = rows.over_long_fate(plan.recipe.data.packing, plan.packing_strategy)
            for report in prepared.reports:
                report.over_long_fate = fate
                log.info("data %s", report.summary())
            report_text = json.dumps([r.to_dict() for r in prepared.reports], indent=2)
            run.data_report_file.write_text(report_text)
            (run.data_cache / LABELS).write_text(json.dumps(prepared.labels))
        except Exception as exc:  # the other ranks must hear of it, then it is raised
            failed = exc
    if any_rank(failed is not None, "cuda" if plan.on_gpu else "cpu"):
        if failed is not None:
            raise failed
        raise RuntimeError("rank 0 could not prepare the data (its log says why)")
    labels = json.loads((run.data_cache / LABELS).read_text())
    return RankData(
        train=train_stream(plan.recipe, plan.stream) if plan.stream else _load(run, "train"),
        validation=_load(run, "validation"),
        labels=labels,
        num_labels=len(labels) if labels else plan.recipe.model.num_labels,
    )


LABELS = "labels.json"  # RUN_DIR/data_cache/labels.json: string label -> id, or null


def _load(run: RunDir, name: str) -> Any:
    """RUN_DIR/data_cache/NAME memory-mapped, or None when the split has no rows."""
    import datasets

    path = run.data_cache / name
    return datasets.load_from_disk(str(path)) if path.is_dir() else None


def tokenized(dataset: Any, tokenizer: Any, max_len: int | None) -> Any:
    """A classification split's text as input ids (the plain Trainer does not tokenize);
    max_len None: no truncation (data.max_seq_len null)."""
    if dataset is None:
        return None

    def tokenize(batch: dict[str, list[Any]]) -> Any:
        return tokenizer(batch["text"], truncation=max_len is not None, max_length=max_len)

    return dataset.map(tokenize, batched=True, remove_columns=["text"])
