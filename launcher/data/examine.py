"""Every row of a source checked, converted and tokenized, a batch at a time in the map
workers of launcher/data/prepare.py: its problem, a hash of the row (duplicates), whether it is
over-long, and its trainer row.

The checks are launcher/data/rows.py's (`rows.row_problem`, the format's `convert`,
`rows.length_problem`) and the token measurement that checks a row against data.max_seq_len is
the tokenization the trainer gets. Trainer rows: for chat SFT formats `input_ids` and the loss
over the trained assistant turns (launcher/data/chat_tokens.py, the masks of
launcher/data/turns.py), as `labels` when completion-only loss is on (what TRL SFTTrainer
would build from `completion_mask`, so that it leaves them as they are) else as
`completion_mask`; for the other formats the trainer row as JSON.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
from collections.abc import Callable
from typing import Any

from launcher.config.schema import DataConfig
from launcher.data import rows
from launcher.data.chat_tokens import ChatTokenizer, completion_mask, labels
from launcher.data.formats import Row, get_format
from launcher.data.mapping import remap
from launcher.data.raw import parsed
from launcher.data.turns import TurnError, conversation


def with_labels(data: DataConfig) -> bool:
    """Whether chat rows carry `labels` (TRL's, from the completion mask) rather than the
    mask: for a turns format trained with completion-only loss, as launcher/train/args.py
    sets SFTConfig.completion_only_loss."""
    fmt = get_format(data.format)
    return fmt.turns and fmt.completion_only and data.completion_only_loss


# rows._key's json.dumps arguments, the encoder built once rather than per row
_KEY = json.JSONEncoder(sort_keys=True, ensure_ascii=False, default=str)


def _row_key(row: Row) -> int:
    """A 64-bit hash of the row as rows._key spells it (duplicates are counted by it)."""
    digest = hashlib.blake2b(_KEY.encode(row).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _chat_payloads(
    chat: ChatTokenizer, checked: list[tuple[int, Row, str | None, Row]], data: DataConfig
) -> list[dict[str, Any] | TurnError]:
    """The trainer columns of the valid chat rows, in order (a TurnError for a row whose
    trained turn has no tokens)."""
    todo = [conversation(t) for _, _, p, t in checked if p is None]
    found = chat.spans(todo, last_only=data.assistant_turns == "last")
    out: list[dict[str, Any] | TurnError] = []
    mark = labels if with_labels(data) else completion_mask_of
    column = "labels" if with_labels(data) else "completion_mask"
    for item in found:
        if isinstance(item, TurnError):
            out.append(item)
        else:
            ids, turns = item
            out.append({"input_ids": ids, column: mark(ids, turns), "_start": turns[0][0]})
    return out


def completion_mask_of(ids: list[int], turns: list[tuple[int, int]]) -> list[int]:
    return completion_mask(len(ids), turns)


def _gc_paused(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run fn with the cyclic garbage collector paused: a batch's rows make no cycles, and
    its lists of token ids would otherwise set off collections that scan the whole worker's
    heap."""

    @functools.wraps(fn)
    def paused(*args: Any, **kwargs: Any) -> Any:
        enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    return paused


@_gc_paused
def examine(
    batch: dict[str, list[Any]],
    indices: list[int],
    *,
    data: DataConfig,
    labels: dict[str, int] | None,
    num_labels: int | None,
    tokenizer: Any,
    chat: ChatTokenizer | None,
    name: str,
    given: list[Row] | None,
) -> dict[str, list[Any]]:
    """One batch of raw rows -> line, problem, key, over, and the trainer row."""
    fmt = get_format(data.format)
    numbered, read_problems = parsed(batch, indices, name, given)
    columns = payload_columns(data)
    checked: list[tuple[int, Row, str | None, Row]] = []  # line, remapped row, problem, trainer row
    for number, source_row in numbered:
        row = remap(source_row, data)
        problem = rows.row_problem(row, data, labels, num_labels)
        trainer_row = fmt.convert(row, data, labels) if problem is None else {}
        checked.append((number, row, problem, trainer_row))
    if chat is not None:
        tokens = iter(_chat_payloads(chat, checked, data))
    else:
        measure = rows.length_fn(tokenizer, data)
    results = []
    for number, row, problem, trainer_row in checked:
        over, payload = False, dict[str, Any]()
        if problem is None:
            if chat is not None:
                found = next(tokens)
                if isinstance(found, TurnError):
                    problem, prompt_len, total = str(found), 0, 0
                else:
                    payload = found
                    prompt_len, total = found.pop("_start"), len(found["input_ids"])
            else:
                try:
                    prompt_len, total = measure(trainer_row)
                except TurnError as exc:
                    prompt_len, total, problem = 0, 0, str(exc)
                payload = {"row": json.dumps(trainer_row, ensure_ascii=False)}
            problem, over = rows.length_problem(data, problem, prompt_len, total)
        results.append((number, problem, _row_key(row) if problem is None else 0, over, payload))
    results += [(p.row, p.problem, 0, False, {}) for p in read_problems]
    if read_problems:  # in line order with the rows
        results.sort(key=lambda r: r[0])
    out: dict[str, list[Any]] = {k: [] for k in ("line", "problem", "key", "over", *columns)}
    for number, problem, key, over, payload in results:
        out["line"].append(number)
        out["problem"].append(problem)
        out["key"].append(key)
        out["over"].append(over)
        for column in columns:
            out[column].append(payload[column] if problem is None else columns[column])
    return out


def payload_columns(data: DataConfig) -> dict[str, Any]:
    """The trainer-row columns of a format, with the value an invalid row gets."""
    if not get_format(data.format).turns:
        return {"row": ""}
    return {"input_ids": [], "labels" if with_labels(data) else "completion_mask": []}


def features(data: DataConfig) -> Any:
    """The examined rows' Arrow types: for the trainer columns, the types Dataset.from_list
    gives the reference rows (and TRL's labels map gives `labels`)."""
    import datasets

    columns = {
        "line": datasets.Value("int64"),
        "problem": datasets.Value("string"),
        "key": datasets.Value("int64"),
        "over": datasets.Value("bool"),
    }
    for column in payload_columns(data):
        if column == "input_ids":
            columns[column] = datasets.List(datasets.Value("int32"))
        elif column == "row":
            columns[column] = datasets.Value("string")
        else:
            columns[column] = datasets.List(datasets.Value("int64"))
    return datasets.Features(columns)


def label_names(
    batch: dict[str, list[Any]],
    indices: list[int],
    *,
    data: DataConfig,
    name: str,
    given: list[Row] | None,
) -> dict[str, list[str]]:
    """The string labels of one batch (rows.label_mapping's names, before validation)."""
    numbered, _ = parsed(batch, indices, name, given)
    found = rows.label_mapping((remap(r, data) for _, r in numbered), data)
    return {"name": sorted(found or {})}
