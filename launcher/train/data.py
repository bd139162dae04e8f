"""The rank's data: the tokenizer, and the validated splits as Arrow files every rank shares.

Every rank reads, validates, converts and splits the same files the same way
(launcher/data/rows.py), conversations tokenized with a loss mask over their assistant turns
(launcher/data/turns.py); rank 0 writes the splits into RUN_DIR/data_cache and every rank
memory-maps them. Only rank 0 logs the data report and writes RUN_DIR/data_report.json.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from typing import Any

from launcher.config.plan import Plan
from launcher.data import rows
from launcher.data.formats import get_format
from launcher.rundir import RunDir
from launcher.train.preflight import barrier

log = logging.getLogger("launcher.train")


@dataclass
class RankData:
    train: Any  # datasets.Dataset: the trainer's rows
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
    """The recipe's data, validated (RecipeError per data.invalid_rows), measured in tokens,
    split the same on every rank, as shared Arrow files."""
    splits = rows.load_splits(plan.recipe, rows.length_fn(tokenizer, plan.recipe.data))
    if main:
        for report in splits.reports:
            log.info("data %s", report.summary())
        report_text = json.dumps([r.to_dict() for r in splits.reports], indent=2)
        run.data_report_file.write_text(report_text)
    labels = splits.labels
    train, validation = splits.train, splits.validation
    if get_format(plan.recipe.data.format).turns:
        # every assistant turn trained, not only the last (launcher/data/turns.py)
        tokenize = rows.tokenized_turns(tokenizer, plan.recipe.data)
        train, validation = [tokenize(r) for r in train], [tokenize(r) for r in validation]
    return RankData(
        train=shared_dataset(run, "train", train, main),
        validation=shared_dataset(run, "validation", validation, main),
        labels=labels,
        num_labels=len(labels) if labels else plan.recipe.model.num_labels,
    )


def shared_dataset(run: RunDir, name: str, split: list[dict[str, Any]], main: bool) -> Any:
    """The split as an Arrow file in RUN_DIR/data_cache/NAME, written by rank 0 and memory-mapped
    by every rank. TRL tokenizes on the main process first and the others then find its cached
    result on disk: the data is tokenized once, not once per rank one after the other (as for
    an in-memory dataset), and no rank holds the tokenized data in RAM."""
    import datasets

    if not split:
        return None
    path = run.data_cache / name
    if main:
        shutil.rmtree(path, ignore_errors=True)  # a previous attempt's files and caches
        datasets.Dataset.from_list(split).save_to_disk(str(path))
    barrier()
    return datasets.load_from_disk(str(path))


def tokenized(dataset: Any, tokenizer: Any, max_len: int) -> Any:
    """A classification split's text as input ids (the plain Trainer does not tokenize)."""
    if dataset is None:
        return None

    def tokenize(batch: dict[str, list[Any]]) -> Any:
        return tokenizer(batch["text"], truncation=True, max_length=max_len)

    return dataset.map(tokenize, batched=True, remove_columns=["text"])
