"""The rank's data preparation in one pass through `datasets`: read, validate, convert and
tokenize each row once, in data.num_proc processes, with nothing of the corpus held in Python.

The same rows, problems and report as launcher/data/rows.py `load_splits` (which stays the
launcher-side check, without a tokenizer): each row goes through the same checks
(`rows.row_problem`, the format's `convert`, `rows.length_problem`), and the token measurement
that checks a row against data.max_seq_len is the tokenization the trainer gets.

1. A source becomes an Arrow file of (line number, raw bytes): a local .jsonl is streamed line
   by line and parsed in the workers (files.py's own line reader, so its problems and line
   numbers are the same); any other source (json, csv, parquet, a hub dataset) is read by
   `files.read_rows` and its rows handed to the workers with the map's arguments.
2. One batched `Dataset.map(num_proc=data.num_proc)` checks every row and gives its problem,
   a hash of the row (duplicates), whether it is over-long, and its trainer row: for chat SFT
   formats `input_ids` and `completion_mask` over the trained assistant turns (rendered and
   tokenized per batch as launcher/data/turns.py does per row), else the trainer row as JSON.
3. The report is counted from those columns with pyarrow; the validation split, max_samples and
   the mix of several sources choose row indices (rows.split_rows and mix.py's rules); the
   chosen rows are written to the output folder as Arrow files.
"""

from __future__ import annotations

import hashlib
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
from launcher.data.files import RowProblem, _read_jsonl, is_local, read_rows
from launcher.data.formats import Row, get_format
from launcher.data.mapping import remap
from launcher.data.mix import mix
from launcher.data.turns import TurnError, _common_prefix, conversation, trained_turns

WRITE_BATCH = 10_000  # raw lines per Arrow record batch
MAP_BATCH = 1_000  # rows per map batch (one tokenizer call for all its texts)


@dataclass
class Prepared:
    train: Any  # datasets.Dataset of trainer rows
    validation: Any  # datasets.Dataset, or None without validation rows
    reports: list[rows.DataReport]
    labels: dict[str, int] | None = None


# --------------------------------------------------------------------------------------------
# 1. Raw rows as an Arrow file


def _streamable(source: DataSource) -> Path | None:
    """The local .jsonl file streamed line by line, or None (read whole by files.read_rows)."""
    path = Path(source.path).expanduser()
    local = is_local(source.path) or Path(source.path).exists()
    if not local or path.suffix.lower() != ".jsonl" or not path.is_file():
        return None
    with path.open("rb") as fh:
        head = fh.read(4)
    if head.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")):
        return None  # UTF-16/32: one problem at line 1, as files.read_rows says it
    return path


def _raw_dataset(
    source: DataSource, field_name: str, out: Path
) -> tuple[Any, list[RowProblem], list[Row] | None]:
    """(Arrow dataset of line and raw line, rows read_rows found unreadable, and for a source
    read whole its rows, in the dataset's order: its `raw` is then empty)."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    features = datasets.Features({"line": datasets.Value("int64"), "raw": datasets.Value("binary")})
    path, problems, given = _streamable(source), list[RowProblem](), None
    file = out / "raw.arrow"
    with ArrowWriter(features=features, path=str(file)) as writer:
        if path is not None:
            with path.open("rb") as fh:
                lines: list[int] = []
                raws: list[bytes] = []
                for number, chunk in enumerate(fh, start=1):
                    chunk = chunk[:-1] if chunk.endswith(b"\n") else chunk
                    if number == 1 and chunk.startswith(b"\xef\xbb\xbf"):
                        chunk = chunk[3:]
                    lines.append(number)
                    raws.append(chunk)
                    if len(lines) == WRITE_BATCH:
                        writer.write_batch({"line": lines, "raw": raws})
                        lines, raws = [], []
                writer.write_batch({"line": lines, "raw": raws})
        else:
            numbered, problems = read_rows(
                source.path,
                field_name,
                subset=source.subset,
                split=source.split,
                data_dir=source.data_dir,
            )
            given = [row for _, row in numbered]
            for start in range(0, len(numbered), WRITE_BATCH):
                part = numbered[start : start + WRITE_BATCH]
                writer.write_batch({"line": [n for n, _ in part], "raw": [b""] * len(part)})
        writer.finalize()
    dataset = datasets.Dataset.from_file(str(file))
    return dataset, problems, given


def _parsed(
    batch: dict[str, list[Any]], indices: list[int], name: str, given: list[Row] | None
) -> tuple[list, list]:
    """(line, row) pairs and RowProblems of one batch of raw rows. jsonl lines go through
    files.py's reader (the batch's lines are consecutive; a leading blank line keeps a byte
    order mark that is not at the file's start a parse problem, as it is there)."""
    if given is not None:
        return [(n, given[i]) for n, i in zip(batch["line"], indices, strict=True)], []
    first = batch["line"][0] if batch["line"] else 1
    found, problems = _read_jsonl(b"\n" + b"\n".join(batch["raw"]), name)
    offset = first - 2
    return [(n + offset, r) for n, r in found], [
        RowProblem(p.source, p.row + offset, p.problem) for p in problems
    ]


# --------------------------------------------------------------------------------------------
# 2. Every row checked, converted and tokenized (in the map workers)


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return list(tokenizer(texts, add_special_tokens=False)["input_ids"])


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return str(
        tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    )


def tokenize_conversations(
    tokenizer: Any, conversations: list[list[dict[str, str]]], *, last_only: bool
) -> list[dict[str, list[int]] | TurnError]:
    """turns.tokenize_turns for many conversations, their texts tokenized in one call: the
    same `input_ids` and `completion_mask` (or the same TurnError) for each."""
    texts: list[str] = []
    plans: list[tuple[int, list[tuple[int, int, int | None]]]] = []
    for messages in conversations:
        last, whole = len(messages) - 1, len(texts)
        texts.append(_render(tokenizer, messages, False))
        spans: list[tuple[int, int, int | None]] = []
        for i in trained_turns(messages, last_only):
            texts.append(_render(tokenizer, messages[:i], True))
            end = None
            if i != last:
                end = len(texts)
                texts.append(_render(tokenizer, messages[: i + 1], False))
            spans.append((i, len(texts) - (2 if end is not None else 1), end))
        plans.append((whole, spans))
    ids = _encode(tokenizer, texts)
    out: list[dict[str, list[int]] | TurnError] = []
    for full_at, spans in plans:
        full = ids[full_at]
        mask = [0] * len(full)
        error = None
        for i, prefix_at, end_at in spans:
            start = _common_prefix(ids[prefix_at], full)
            end = len(full) if end_at is None else _common_prefix(ids[end_at], full)
            if end <= start:
                error = TurnError(
                    f"assistant turn {i} (messages[{i}]) has no tokens of its own in the "
                    "rendered conversation: the chat template renders it differently when "
                    "later turns follow"
                )
                break
            mask[start:end] = [1] * (end - start)
        out.append(error or {"input_ids": full, "completion_mask": mask})
    return out


def _row_key(row: Row) -> int:
    """A 64-bit hash of the row as rows._key spells it (duplicates are counted by it)."""
    digest = hashlib.blake2b(rows._key(row).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _examine(
    batch: dict[str, list[Any]],
    indices: list[int],
    *,
    data: DataConfig,
    labels: dict[str, int] | None,
    num_labels: int | None,
    tokenizer: Any,
    name: str,
    given: list[Row] | None,
) -> dict[str, list[Any]]:
    """One batch of raw rows -> line, problem, key, over, and the trainer row."""
    fmt = get_format(data.format)
    numbered, read_problems = _parsed(batch, indices, name, given)
    out: dict[str, list[Any]] = {k: [] for k in ("line", "problem", "key", "over", *_payload(fmt))}
    checked: list[tuple[int, Row, str | None, Row]] = []  # line, remapped row, problem, trainer row
    for number, source_row in numbered:
        row = remap(source_row, data)
        problem = rows.row_problem(row, data, labels, num_labels)
        trainer_row = fmt.convert(row, data, labels) if problem is None else {}
        checked.append((number, row, problem, trainer_row))
    if fmt.turns:
        todo = [conversation(t) for _, _, p, t in checked if p is None]
        tokens = iter(
            tokenize_conversations(tokenizer, todo, last_only=data.assistant_turns == "last")
        )
    else:
        measure = rows.length_fn(tokenizer, data)
    results = []
    for number, row, problem, trainer_row in checked:
        over, payload = False, dict[str, Any]()
        if problem is None:
            if fmt.turns:
                found = next(tokens)
                if isinstance(found, TurnError):
                    problem, prompt_len, total = str(found), 0, 0
                else:
                    payload = found
                    prompt_len, total = found["completion_mask"].index(1), len(found["input_ids"])
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
    for number, problem, key, over, payload in results:
        out["line"].append(number)
        out["problem"].append(problem)
        out["key"].append(key)
        out["over"].append(over)
        for column, empty in _payload(fmt).items():
            out[column].append(payload[column] if problem is None else empty)
    return out


def _payload(fmt: Any) -> dict[str, Any]:
    """The trainer-row columns of a format, with the value an invalid row gets."""
    return {"input_ids": [], "completion_mask": []} if fmt.turns else {"row": ""}


def _features(fmt: Any) -> Any:
    import datasets

    columns = {
        "line": datasets.Value("int64"),
        "problem": datasets.Value("string"),
        "key": datasets.Value("int64"),
        "over": datasets.Value("bool"),
    }
    if fmt.turns:  # the types Dataset.from_list gives these columns
        columns["input_ids"] = datasets.List(datasets.Value("int32"))
        columns["completion_mask"] = datasets.List(datasets.Value("int64"))
    else:
        columns["row"] = datasets.Value("string")
    return datasets.Features(columns)


def _label_names(
    batch: dict[str, list[Any]],
    indices: list[int],
    *,
    data: DataConfig,
    name: str,
    given: list[Row] | None,
) -> dict[str, list[str]]:
    """The string labels of one batch (rows.label_mapping's names, before validation)."""
    numbered, _ = _parsed(batch, indices, name, given)
    found = rows.label_mapping((remap(r, data) for _, r in numbered), data)
    return {"name": sorted(found or {})}


# --------------------------------------------------------------------------------------------
# 3. Reports, splits and the mix


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
            dataset, problems, given = _raw_dataset(source, field_name, out)
            self.raws[key] = (dataset, problems, given, own, rows.source_name(source))
        return self.raws[key]

    def label_names(self, source: DataSource, field_name: str) -> set[str]:
        raw, _, given, own, name = self.raw(source, field_name)
        kwargs = {"data": own, "name": name, "given": given}
        names = raw.map(
            _label_names, fn_kwargs=kwargs, with_indices=True, remove_columns=raw.column_names,
            **_map_kwargs(own, raw),
        )  # fmt: skip
        return set(names["name"])

    def examine(
        self, source: DataSource, field_name: str, labels: dict[str, int] | None
    ) -> _Source:
        import numpy as np
        import pyarrow.compute as pc

        raw, read_problems, given, own, name = self.raw(source, field_name)
        fmt = get_format(own.format)
        kwargs = {"data": own, "labels": labels, "num_labels": self.num_labels,
                  "tokenizer": self.tokenizer, "name": name, "given": given}  # fmt: skip
        examined = raw.map(
            _examine, fn_kwargs=kwargs, with_indices=True, remove_columns=raw.column_names,
            features=_features(fmt), **_map_kwargs(own, raw),
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
        keys = table.column("key").filter(good)
        report = rows.DataReport(
            source=name,
            read=len(examined) + len(read_problems),
            valid=len(valid),
            problems=sorted(problems, key=lambda p: p.row),
            duplicates=len(valid) - pc.count_distinct(keys).as_py(),
            over_long=pc.sum(table.column("over").filter(good)).as_py() or 0,
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

    chosen = [ds.select(at) for ds, at in segments if len(at)]
    if not chosen:
        return None
    split = chosen[0] if len(chosen) == 1 else datasets.concatenate_datasets(chosen)
    if get_format(data.format).turns:
        split = split.select_columns(["input_ids", "completion_mask"])
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
