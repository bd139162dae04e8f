"""The rank's data preparation in one pass through `datasets`: read, validate, convert and
tokenize each row once, in data.num_proc processes, with nothing of the corpus held in Python.

The same rows, problems and report as launcher/data/rows.py `load_splits` (which stays the
launcher-side check, without a tokenizer), in three steps:

1. a source becomes an Arrow file of (line number, raw bytes) (launcher/data/raw.py);
2. one batched `Dataset.map(num_proc=data.num_proc)` checks every row and gives its problem,
   a hash of the row (duplicates), whether it is over-long, and its trainer row
   (launcher/data/examine.py: for chat SFT formats `input_ids` and the loss over the trained
   assistant turns, as TRL's `labels` under completion-only loss, else `completion_mask`;
   for the other formats the trainer row as JSON);
3. here: the report is counted from those columns with pyarrow; the validation split,
   max_samples and the mix of several sources choose row indices (rows.split_rows and mix.py's
   rules); the chosen rows are written to the output folder as Arrow files.
"""

from __future__ import annotations

import json
import random
import shutil
import uuid
from array import array
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from launcher.config.schema import DataConfig, DataSource, Recipe
from launcher.data import rows
from launcher.data.chat_tokens import ChatTokenizer
from launcher.data.examine import examine, features, label_names, payload_columns
from launcher.data.files import RowProblem, read_rows
from launcher.data.formats import Row, get_format
from launcher.data.mix import mix
from launcher.data.raw import raw_dataset

MAP_BATCH = 1_000  # rows per map batch (one tokenizer call for all its texts)


@dataclass
class Prepared:
    train: Any  # datasets.Dataset of trainer rows
    validation: Any  # datasets.Dataset, or None without validation rows
    reports: list[rows.DataReport]
    labels: dict[str, int] | None = None


# --------------------------------------------------------------------------------------------
# Reports, splits and the mix


@dataclass
class _Source:
    """One source after its map: its examined rows, indices of the valid ones, its report."""

    examined: Any
    valid: Any  # numpy int64 indices into `examined`
    report: rows.DataReport


def _map_kwargs(data: DataConfig, raw: Any) -> dict[str, Any]:
    procs = data.num_proc if data.num_proc and data.num_proc > 1 and len(raw) > 1 else None
    # a fresh folder every time: nothing to find in a cache, no fingerprint worth hashing
    return {"batched": True, "batch_size": MAP_BATCH, "num_proc": procs,
            "load_from_cache_file": False, "new_fingerprint": uuid.uuid4().hex}  # fmt: skip


class _Reader:
    """Sources read into `work` (one folder each), their label names and examined rows."""

    def __init__(self, recipe: Recipe, tokenizer: Any, work: Path) -> None:
        self.data, self.tokenizer, self.work = recipe.data, tokenizer, work
        self.chat = ChatTokenizer(tokenizer) if get_format(recipe.data.format).turns else None
        self.num_labels = recipe.model.num_labels
        self.raws: dict[int, tuple[Any, list[RowProblem], list[Row] | None, DataConfig, str]] = {}

    def raw(
        self, source: DataSource, field_name: str
    ) -> tuple[Any, list[RowProblem], list[Row] | None, DataConfig, str]:
        key = id(source)
        if key not in self.raws:
            out = self.work / f"source-{len(self.raws)}"
            out.mkdir(parents=True)
            own = (
                self.data.model_copy(update={"columns": source.columns})
                if source.columns
                else self.data
            )
            dataset, problems, given = raw_dataset(source, field_name, out)
            self.raws[key] = (dataset, problems, given, own, rows.source_name(source))
        return self.raws[key]

    def label_names(self, source: DataSource, field_name: str) -> set[str]:
        raw, _, given, own, name = self.raw(source, field_name)
        kwargs = {"data": own, "name": name, "given": given}
        names = raw.map(
            label_names, fn_kwargs=kwargs, with_indices=True, remove_columns=raw.column_names,
            **_map_kwargs(own, raw),
        )  # fmt: skip
        return set(names["name"])

    def examine(
        self, source: DataSource, field_name: str, labels: dict[str, int] | None
    ) -> _Source:
        import numpy as np
        import pyarrow.compute as pc

        raw, read_problems, given, own, name = self.raw(source, field_name)
        kwargs = {"data": own, "labels": labels, "num_labels": self.num_labels,
                  "tokenizer": self.tokenizer, "chat": self.chat, "name": name,
                  "given": given}  # fmt: skip
        examined = raw.map(
            examine, fn_kwargs=kwargs, with_indices=True, remove_columns=raw.column_names,
            features=features(own), **_map_kwargs(own, raw),
        )  # fmt: skip
        if len(examined) == 0 and given is None:
            read_rows(source.path, field_name)  # blank lines only: files.py's own RecipeError
        table = examined.data
        bad = pc.is_valid(table.column("problem"))
        good = pc.invert(bad)
        problems = list(read_problems)
        for line, problem in zip(
            table.column("line").filter(bad).to_pylist(),
            table.column("problem").filter(bad).to_pylist(),
            strict=True,
        ):
            problems.append(RowProblem(name, line, problem))
        valid = np.flatnonzero(good.to_numpy(zero_copy_only=False))
        # counted in numpy, whose large buffers go back to the system when freed (pyarrow's
        # hash table for count_distinct stayed in its allocator: ~200 bytes a row for good)
        keys = table.column("key").to_numpy()[valid]
        keys.sort()
        distinct = 1 + int(np.count_nonzero(keys[1:] != keys[:-1])) if len(keys) else 0
        over = table.column("over").to_numpy()[valid]
        report = rows.DataReport(
            source=name,
            read=len(examined) + len(read_problems),
            valid=len(valid),
            problems=sorted(problems, key=lambda p: p.row),
            duplicates=len(valid) - distinct,
            over_long=int(over.sum()),
            measured=True,
        )
        return _Source(examined, valid, report)


def split_indices(count: int, val_split: float, seed: int) -> tuple[Any, Any]:
    """rows.split_rows on positions 0..count-1 (the same rows held out), as numpy indices,
    the shuffle over a compact array rather than a list of Python ints."""
    import numpy as np

    every = np.arange(count, dtype=np.int64)
    if val_split <= 0 or count < 2:
        return every, every[:0]
    n_val = min(count - 1, max(1, round(count * val_split)))
    order = array("q", range(count))
    random.Random(seed).shuffle(order)
    held = np.sort(np.frombuffer(order, dtype=np.int64)[:n_val])
    keep = np.ones(count, dtype=bool)
    keep[held] = False
    return every[keep], held


def _decoded(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    found = [json.loads(r) for r in batch["row"]]
    return {key: [r[key] for r in found] for key in found[0]} if found else {}


def _written(segments: list[tuple[Any, Any]], data: DataConfig, path: Path) -> Any:
    """The chosen rows of the examined datasets, in order, as an Arrow dataset at `path`
    (their trainer-row columns only), or None when no row is chosen."""
    import datasets
    import numpy as np

    # every row in order (no invalid row, no split, no cap): the dataset itself, without an
    # indices mapping to build and flatten
    chosen = [
        ds if np.array_equal(at, np.arange(len(ds))) else ds.select(at)
        for ds, at in segments
        if len(at)
    ]
    if not chosen:
        return None
    split = chosen[0] if len(chosen) == 1 else datasets.concatenate_datasets(chosen)
    if get_format(data.format).turns:
        split = split.select_columns(list(payload_columns(data)))
    else:
        split = split.select_columns(["row"]).flatten_indices()
        split = split.map(_decoded, remove_columns=["row"], **_map_kwargs(data, split))
    split.save_to_disk(str(path))
    return path


def _mixed(
    parts: list[tuple[Any, Any]], sources: list[DataSource], data: DataConfig
) -> tuple[list[tuple[Any, Any]], list[int]]:
    """The training mix as segments (dataset, indices) and the rows each source gave it:
    mix.py's rules on positions, capped by data.max_samples."""
    import numpy as np

    if len(parts) == 1:
        ds, at = parts[0]
        at = at[: data.max_samples]
        return [(ds, at)], [len(at)]
    positions: list[Any] = [range(len(at)) for _, at in parts]  # mix.py's rules on positions
    mixed = mix(positions, [s.weight for s in sources], data.seed)
    mixed = mixed[: data.max_samples]
    used = [0] * len(parts)
    segments: list[tuple[int, list[int]]] = []
    for i, j in mixed:  # runs of one source kept together: fewer, longer selections
        used[i] += 1
        index = int(parts[i][1][j])
        if segments and segments[-1][0] == i:
            segments[-1][1].append(index)
        else:
            segments.append((i, [index]))
    return [(parts[i][0], np.asarray(at, dtype=np.int64)) for i, at in segments], used


def prepare_splits(recipe: Recipe, tokenizer: Any, out: Path) -> Prepared:
    """rows.load_splits with the rows tokenized for the trainer, as Arrow datasets in
    out/train and out/validation: the same problems (RecipeError per data.invalid_rows), the
    same report, the same rows in the same order."""
    import datasets

    data = recipe.data
    shutil.rmtree(out, ignore_errors=True)
    work = out / "work"
    reader = _Reader(recipe, tokenizer, work)
    fmt = get_format(data.format)
    sources = data.train_sources()
    labels = None

    def names(source: DataSource, field_name: str) -> set[str]:
        return reader.label_names(source, field_name)

    def mapping(found: set[str]) -> dict[str, int] | None:
        return {name: i for i, name in enumerate(sorted(found))} if found else None

    train_fields = [rows._field("data.train", data.train, i) for i in range(len(sources))]
    if fmt.trainer == "classification" and len(sources) > 1:
        labels = mapping(
            set().union(*(names(s, f) for s, f in zip(sources, train_fields, strict=True)))
        )

    def checked(source: DataSource, field_name: str, known: Any) -> tuple[_Source, Any]:
        if fmt.trainer == "classification" and known is None:
            known = mapping(names(source, field_name))
        found = reader.examine(source, field_name, known)
        rows._fail_or_warn(found.report, data, field_name)
        return found, known

    parts, validation, reports = [], [], []
    for source, field_name in zip(sources, train_fields, strict=True):
        found, labels = checked(source, field_name, labels)
        train_at = found.valid
        if not data.validation:
            kept, held = split_indices(len(found.valid), data.val_split, data.seed)
            train_at = found.valid[kept]
            validation.append((found.examined, found.valid[held]))
        parts.append((found.examined, train_at[: source.max_samples]))
        reports.append(replace(found.report, weight=source.weight))
    for i, source in enumerate(data.validation_sources()):
        found, _ = checked(source, rows._field("data.validation", data.validation, i), labels)
        chosen = found.valid[: source.max_samples]
        validation.append((found.examined, chosen))
        reports.append(replace(found.report, role="validation", used=len(chosen)))
    segments, used = _mixed(parts, sources, data)
    for report, count in zip(reports, used, strict=False):
        report.used = count
    train = _written(segments, data, out / "train")
    held_out = _written(validation, data, out / "validation")
    shutil.rmtree(work, ignore_errors=True)
    return Prepared(
        train=datasets.load_from_disk(str(train)) if train else None,
        validation=datasets.load_from_disk(str(held_out)) if held_out else None,
        reports=reports,
        labels=labels,
    )
