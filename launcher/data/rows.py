"""Datasets: read, validate, convert to what TRL / transformers train on, split; chat template.

The same checks run twice: on the launcher side before any process starts
(`validate_data(recipe)`, so bad data fails in a second with exit 2), and on rank 0, where
launcher/data/prepare.py applies them (`row_problem`, `length_problem`) to every row in one
`datasets.map` pass that also tokenizes it; both are deterministic, the same files give the
same rows, problems and report. What a valid row of each
data.format holds, and the row its trainer takes, is the format's own (launcher/data/formats.py).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from launcher.config.schema import DataConfig, DataSource, Recipe
from launcher.data.files import RowProblem, is_local, read_rows
from launcher.data.formats import Row, class_label, get_format
from launcher.data.mapping import remap
from launcher.data.mix import mix
from launcher.data.templates import TEMPLATES
from launcher.data.turns import TurnError, conversation, tokenize_turns
from launcher.errors import Problem, RecipeError

log = logging.getLogger(__name__)

MAX_LISTED = 20  # problems listed in an error; the rest are counted
PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<|endoftext|>")


@dataclass
class DataReport:
    """What validation found in one source."""

    source: str
    read: int = 0  # rows parsed (and lines that failed to parse)
    valid: int = 0
    problems: list[RowProblem] = field(default_factory=list)
    duplicates: int = 0  # kept: repeated rows are often intended (upsampling)
    over_long: int = 0  # longer than max_seq_len in tokens: see over_long_fate
    over_long_fate: str = "truncated"  # or what packing does with them (over_long_fate())
    measured: bool = False  # whether token lengths were checked
    role: str = "train"  # train or validation
    weight: float | None = None  # data.train[i].weight
    used: int | None = None  # rows of this source in the split trained (or evaluated) on

    def summary(self) -> str:
        parts = [f"{self.source} ({self.role}): {self.read} rows, {self.valid} valid"]
        if self.problems:
            parts.append(f"{len(self.problems)} invalid")
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicates (kept)")
        if self.measured:
            parts.append(f"{self.over_long} longer than max_seq_len ({self.over_long_fate})")
        else:
            parts.append("token lengths not checked (no tokenizer yet)")
        if self.used is not None:
            weight = f", weight {self.weight:g}" if self.weight is not None else ""
            into = "the training mix" if self.role == "train" else "validation"
            parts.append(f"{self.used} in {into}{weight}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "role": self.role,
            "weight": self.weight,
            "used": self.used,
            "read": self.read,
            "valid": self.valid,
            "invalid": len(self.problems),
            "duplicates": self.duplicates,
            "over_long": self.over_long,
            "over_long_fate": self.over_long_fate,
            "problems": [p.render() for p in self.problems[:MAX_LISTED]],
        }


def over_long_fate(packing: bool, strategy: str) -> str:
    """What training does with an example longer than max_seq_len: TRL truncates it unless
    packing carries the rest into further blocks (wrapped and bfd_split packing)."""
    if packing and strategy in ("wrapped", "bfd_split"):
        return "the rest continued in the next packed block"
    return "truncated"


def label_mapping(rows: Iterable[Row], data: DataConfig) -> dict[str, int] | None:
    """Sorted string labels -> ids, or None when the labels are integers."""
    names = set()
    for row in rows:
        label = class_label(row.get(data.label_column))
        if isinstance(label, str):
            names.add(label.strip())
    return {name: i for i, name in enumerate(sorted(names))} if names else None


def _key(row: Row) -> str:
    return json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)


# --------------------------------------------------------------------------------------------
# Token lengths (rank side, or the launcher when a tokenizer is at hand)

LengthFn = Callable[[Row], tuple[int, int]]  # trainer row -> (prompt tokens, total tokens)


def length_fn(tokenizer: Any, data: DataConfig) -> LengthFn:
    """Token counts of a trainer row as the trainer will see it (chat template applied)."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def render(messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return str(
            tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
        )

    def measure(row: Row) -> tuple[int, int]:
        if "text" in row:
            total = len(tokenizer(row["text"])["input_ids"])
            return 0, total
        if "completion" in row:  # a conversation: the first trained token ends its prompt
            tokens = tokenized_turns(tokenizer, data)(row)
            return tokens["completion_mask"].index(1), len(tokens["input_ids"])
        prompt = count(render(row["prompt"], True))
        longest = max(
            count(render(row["prompt"] + row[key], False)) for key in ("chosen", "rejected")
        )
        return prompt, longest

    return measure


def tokenized_turns(tokenizer: Any, data: DataConfig) -> Callable[[Row], dict[str, list[int]]]:
    """A chat trainer row (prompt + completion) as `input_ids` and a `completion_mask` over the
    assistant turns data.assistant_turns trains (launcher/data/turns.py); TurnError when a
    trained turn gets no token."""
    last_only = data.assistant_turns == "last"

    def tokenize(row: Row) -> dict[str, list[int]]:
        return tokenize_turns(tokenizer, conversation(row), last_only=last_only)

    return tokenize


# --------------------------------------------------------------------------------------------
# Validation of a whole source


def source_name(source: DataSource) -> str:
    """How reports name a source: a file's name, or a hub id with its subset and split."""
    if is_local(source.path) or Path(source.path).exists():
        return Path(source.path).name
    folder = f", {source.data_dir}" if source.data_dir else ""
    return f"{source.path} ({source.subset or 'default'}{folder}, {source.split})"


def _read(source: DataSource, field_name: str) -> tuple[list[tuple[int, Row]], list[RowProblem]]:
    return read_rows(
        source.path,
        field_name,
        subset=source.subset,
        split=source.split,
        data_dir=source.data_dir,
    )


def row_problem(
    row: Row, data: DataConfig, labels: dict[str, int] | None, num_labels: int | None
) -> str | None:
    """Why a (remapped) row is invalid for data.format and the label ids, or None."""
    fmt = get_format(data.format)
    problem = fmt.problem(row, data, None if labels else num_labels)
    if problem is None and labels and num_labels is not None and len(labels) > num_labels:
        problem = f"{len(labels)} distinct string labels but model.num_labels={num_labels}"
    if problem is None and fmt.trainer == "classification" and labels:
        label = str(row[data.label_column]).strip()
        if label not in labels:
            problem = f"label {label!r} is not among the training labels {sorted(labels)}"
    return problem


def length_problem(
    data: DataConfig, problem: str | None, prompt_len: int, total: int
) -> tuple[str | None, bool]:
    """A measured row against data.max_seq_len: (its problem, whether it is over-long and
    truncated). A chat prompt that fills max_seq_len leaves no completion token to train."""
    limit = data.max_seq_len
    if limit is None:  # no truncation: every row whole
        return problem, False
    if problem is None and get_format(data.format).chat and prompt_len >= limit:
        return (
            f"prompt is {prompt_len} tokens, max_seq_len is {limit}: "
            "no completion token would be trained"
        ), False
    return problem, total > limit


def check_source(
    source: str | DataSource,
    data: DataConfig,
    *,
    num_labels: int | None,
    measure: LengthFn | None = None,
    field_name: str = "data.train",
    labels: dict[str, int] | None = None,
) -> tuple[list[Row], DataReport, dict[str, int] | None]:
    """Read and validate one source: (valid rows as trainer rows, report, string-label ids)."""
    if isinstance(source, str):
        source = DataSource(path=source)
    if source.columns is not None:  # this source's own column names
        data = data.model_copy(update={"columns": source.columns})
    numbered, problems = _read(source, field_name)
    name = source_name(source)
    report = DataReport(source=name, read=len(numbered) + len(problems))
    fmt = get_format(data.format)
    if fmt.trainer == "classification" and labels is None:
        labels = label_mapping((remap(r, data) for _, r in numbered), data)
    seen: set[str] = set()
    valid: list[Row] = []
    for number, source_row in numbered:
        row = remap(source_row, data)
        problem = row_problem(row, data, labels, num_labels)
        if problem is None:
            trainer_row = fmt.convert(row, data, labels)
            if measure is not None:
                try:
                    prompt_len, total = measure(trainer_row)
                except TurnError as exc:
                    prompt_len, total, problem = 0, 0, str(exc)
                problem, over_long = length_problem(data, problem, prompt_len, total)
                report.over_long += over_long
        if problem is not None:
            problems.append(RowProblem(name, number, problem))
            continue
        key = _key(row)
        if key in seen:
            report.duplicates += 1
        seen.add(key)
        valid.append(trainer_row)
    report.problems = sorted(problems, key=lambda p: p.row)
    report.valid = len(valid)
    report.measured = measure is not None
    return valid, report, labels


def _fail_or_warn(report: DataReport, data: DataConfig, field_name: str) -> None:
    if report.problems and data.invalid_rows == "error":
        listed = [
            Problem(f"{p.source}:{p.row}", p.problem, "fix or remove the row")
            for p in report.problems[:MAX_LISTED]
        ]
        more = len(report.problems) - len(listed)
        listed.append(
            Problem(
                field_name,
                f"{len(report.problems)} invalid row(s) of {report.read}"
                + (f" ({more} more not listed)" if more > 0 else ""),
                "fix them, or set data.invalid_rows=drop to skip them with a warning",
            )
        )
        raise RecipeError(listed, f"data {report.source}")
    if report.problems:
        log.warning(
            "dropping %d invalid row(s) of %s (data.invalid_rows=drop); first: %s",
            len(report.problems),
            report.source,
            "; ".join(p.render() for p in report.problems[:5]),
        )
    if report.valid == 0:
        raise RecipeError(
            [Problem(field_name, f"no valid rows in {report.source}", "check data.format")],
            f"data {report.source}",
        )


@dataclass
class Splits:
    train: list[Row]
    validation: list[Row]
    reports: list[DataReport]
    labels: dict[str, int] | None = None


def split_rows(rows: list[Row], val_split: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Deterministic train/validation split: the same rows on every rank and every rerun."""
    if val_split <= 0 or len(rows) < 2:
        return rows, []
    n_val = min(len(rows) - 1, max(1, round(len(rows) * val_split)))
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def _field(name: str, value: object, index: int) -> str:
    """The field path of one source: data.train for the string form, data.train.0 in a list."""
    return name if isinstance(value, str) else f"{name}.{index}"


def _labels_across(sources: list[DataSource], data: DataConfig) -> dict[str, int] | None:
    """String labels -> ids over every training source (classification with several)."""
    rows: list[Row] = []
    for i, source in enumerate(sources):
        own = data.model_copy(update={"columns": source.columns}) if source.columns else data
        numbered, _ = _read(source, _field("data.train", data.train, i))
        rows += [remap(row, own) for _, row in numbered]
    return label_mapping(rows, data)


def load_splits(recipe: Recipe, measure: LengthFn | None = None) -> Splits:
    """Read, validate (RecipeError per data.invalid_rows), convert, split and mix the recipe's
    data: each training source split (data.val_split) and capped (its max_samples), then the
    sources mixed by their weights (launcher/data/mix.py), then capped by data.max_samples."""
    data = recipe.data
    num_labels = recipe.model.num_labels
    sources = data.train_sources()
    labels = None
    if get_format(data.format).trainer == "classification" and len(sources) > 1:
        labels = _labels_across(sources, data)
    parts: list[list[Row]] = []
    validation: list[Row] = []
    reports: list[DataReport] = []

    def checked(source: DataSource, field_name: str) -> tuple[list[Row], DataReport, Any]:
        found = check_source(
            source, data, num_labels=num_labels, measure=measure, field_name=field_name,
            labels=labels,
        )  # fmt: skip
        _fail_or_warn(found[1], data, field_name)
        return found

    for i, source in enumerate(sources):
        rows, report, labels = checked(source, _field("data.train", data.train, i))
        if not data.validation:
            rows, held = split_rows(rows, data.val_split, data.seed)
            validation += held
        parts.append(rows[: source.max_samples])
        reports.append(replace(report, weight=source.weight))
    for i, source in enumerate(data.validation_sources()):
        rows, report, _ = checked(source, _field("data.validation", data.validation, i))
        validation += rows[: source.max_samples]
        reports.append(replace(report, role="validation", used=len(rows[: source.max_samples])))
    mixed = mix(parts, [s.weight for s in sources], data.seed)[: data.max_samples]
    for i, report in enumerate(reports[: len(sources)]):
        report.used = sum(1 for origin, _ in mixed if origin == i)
    return Splits(
        train=[row for _, row in mixed], validation=validation, reports=reports, labels=labels
    )


def validate_data(recipe: Recipe, tokenizer: Any = None) -> list[DataReport]:
    """Launcher-side check before any process starts: RecipeError (exit 2) for a missing or
    empty file, and for invalid rows when data.invalid_rows=error. Token lengths are checked
    when a tokenizer is given. A streamed recipe (data.streaming) has its stream's first rows
    checked, not the whole stream (launcher/data/stream.py)."""
    if recipe.data.streaming:
        from launcher.config.plan import stream_for
        from launcher.data.stream import check_stream

        return check_stream(recipe, stream_for(recipe) or {})
    measure = length_fn(tokenizer, recipe.data) if tokenizer is not None else None
    return load_splits(recipe, measure).reports


# --------------------------------------------------------------------------------------------
# Tokenizer: chat template, pad token, and the contract saved with every checkpoint


def _chat_template(tokenizer: Any, data: DataConfig) -> bool:
    """data.chat_template: a named template (launcher/data/templates.py, its special tokens
    added when missing and its end-of-turn made EOS) or Jinja text. True if tokens were added."""
    named = TEMPLATES.get(data.chat_template or "")
    if named is None:
        if data.chat_template:
            tokenizer.chat_template = data.chat_template
        return False
    missing = [t for t in named.special_tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    tokenizer.chat_template = named.jinja
    if named.end_of_turn and not data.eos_token:
        tokenizer.eos_token = named.end_of_turn
    return bool(missing)


def _special_token(tokenizer: Any, value: str, path: str) -> None:
    if value not in tokenizer.get_vocab():
        raise RecipeError(
            [
                Problem(
                    path, "not a token of the tokenizer", "name a token in its vocabulary", value
                )
            ],
            "data",
        )


def prepare_tokenizer(tokenizer: Any, recipe: Recipe) -> bool:
    """Set the chat template, the EOS token (data.eos_token) and the pad token: data.pad_token
    (the EOS itself allowed for generative training: TRL's collators mask padding by the
    attention mask, never by token id, so a trained EOS keeps its label; refused for a
    classifier, whose pooling finds the last token by the pad id), else the tokenizer's when
    distinct from EOS, else a free candidate, else a new one. True if a token was added (the
    model's embeddings must then be resized)."""
    data = recipe.data
    added = _chat_template(tokenizer, data)
    if get_format(data.format).chat and not tokenizer.chat_template:
        raise RecipeError(
            [
                Problem(
                    "data.chat_template",
                    f"the tokenizer has no chat template and data.format={data.format} needs one",
                    "set data.chat_template to a Jinja template or one of "
                    + ", ".join(TEMPLATES)
                    + " (the one vLLM will serve with)",
                )
            ],
            "data",
        )
    if data.eos_token:
        _special_token(tokenizer, data.eos_token, "data.eos_token")
        tokenizer.eos_token = data.eos_token
    eos = tokenizer.eos_token_id
    if data.pad_token:
        if data.pad_token == tokenizer.eos_token and recipe.model.task != "causal_lm":
            raise RecipeError(
                [
                    Problem(
                        "data.pad_token",
                        "equals the EOS token: a sequence classifier pools the last token "
                        "before the first pad, so a trailing EOS would be read as padding",
                        "name another token, or remove it (a free one is chosen)",
                        data.pad_token,
                    )
                ],
                "data",
            )
        if data.pad_token in tokenizer.get_vocab():
            tokenizer.pad_token = data.pad_token
            return added
        tokenizer.add_special_tokens({"pad_token": data.pad_token})
        return True
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return added
    vocab = tokenizer.get_vocab()
    for candidate in (tokenizer.unk_token, *PAD_CANDIDATES):
        if candidate and candidate in vocab and vocab[candidate] != eos:
            tokenizer.pad_token = candidate
            return added
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return True


def eos_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    extra = getattr(generation_config, "eos_token_id", None) if generation_config else None
    for value in [extra] if isinstance(extra, int) else list(extra or []):
        if value not in ids:
            ids.append(value)
    return ids


def train_contract(tokenizer: Any, generation_config: Any = None) -> dict[str, Any]:
    """RUN_DIR/final/train_contract.json: what serving must reproduce."""
    return {
        "chat_template": tokenizer.chat_template,
        "eos_token": tokenizer.eos_token,
        "eos_token_id": tokenizer.eos_token_id,
        "eos_token_ids": eos_ids(tokenizer, generation_config),
        "pad_token": tokenizer.pad_token,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
