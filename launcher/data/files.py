"""Reading data files row by row, keeping each row's number for error messages.

jsonl (one object per line), json (a list of objects), csv (with a header), parquet, or a
hub dataset id with its subset and split (read offline from the local Hugging Face cache, never
downloaded: a dataset not there is a RecipeError naming the `hf download` that fetches it).
Rows that cannot be read (malformed JSON, bytes that are not UTF-8, a line over MAX_ROW_BYTES,
wrong shapes) come back as RowProblems with their 1-based line (jsonl, csv) or item (json, parquet) number; a UTF-16/32
file is one problem at line 1; a missing or empty file, or a directory, is a RecipeError.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.errors import Problem, RecipeError

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# one row (a jsonl or csv line) larger than this is a broken file (lost line breaks), not data:
# a 1M-token example is a few MB even with every character JSON-escaped
MAX_ROW_BYTES = 16 * 2**20
_BOMS = {
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe": "UTF-16",
    b"\xfe\xff": "UTF-16",
}

Row = dict[str, Any]


@dataclass(frozen=True)
class RowProblem:
    """One invalid row: where it is (1-based line, or item for .json/.parquet) and what is wrong."""

    source: str
    row: int
    problem: str

    def render(self) -> str:
        return f"{self.source}:{self.row}: {self.problem}"


def is_local(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source.endswith(LOCAL_SUFFIXES)


def _decode_lines(raw: bytes, name: str) -> tuple[list[tuple[int, str]], list[RowProblem]]:
    """Split into (1-based line number, text) with strict UTF-8 per line."""
    lines, problems = [], []
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    for number, chunk in enumerate(raw.split(b"\n"), start=1):
        if len(chunk) > MAX_ROW_BYTES:
            problems.append(
                RowProblem(
                    name,
                    number,
                    f"line of {len(chunk) / 2**20:.1f} MiB, more than the "
                    f"{MAX_ROW_BYTES // 2**20} MiB a row may hold (lost line breaks?)",
                )
            )
            continue
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(
                RowProblem(
                    name,
                    number,
                    f"not valid UTF-8 (byte 0x{chunk[exc.start]:02x} at column {exc.start + 1}); "
                    "re-save the file as UTF-8",
                )
            )
            continue
        lines.append((number, text.rstrip("\r")))
    return lines, problems


def _read_jsonl(raw: bytes, name: str) -> tuple[list[tuple[int, Row]], list[RowProblem]]:
    lines, problems = _decode_lines(raw, name)
    rows = []
    for number, text in lines:
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append(
                RowProblem(name, number, f"malformed JSON: {exc.msg} at column {exc.colno}")
            )
            continue
        if not isinstance(value, dict):
            problems.append(
                RowProblem(name, number, f"expected a JSON object, got {type(value).__name__}")
            )
            continue
        rows.append((number, value))
    return rows, problems


def _read_json(raw: bytes, name: str) -> tuple[list[tuple[int, Row]], list[RowProblem]]:
    try:
        value = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return [], [RowProblem(name, line, "not valid UTF-8; re-save the file as UTF-8")]
    except json.JSONDecodeError as exc:
        return [], [RowProblem(name, exc.lineno, f"malformed JSON: {exc.msg}")]
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        value = next(iter(value.values()))  # {"data": [...]}
    if not isinstance(value, list):
        return [], [RowProblem(name, 1, "expected a list of objects (or use .jsonl)")]
    rows, problems = [], []
    for number, item in enumerate(value, start=1):
        if isinstance(item, dict):
            rows.append((number, item))
        else:
            problems.append(
                RowProblem(name, number, f"item is a {type(item).__name__}, not an object")
            )
    return rows, problems


def _read_csv(raw: bytes, name: str) -> tuple[list[tuple[int, Row]], list[RowProblem]]:
    lines, problems = _decode_lines(raw, name)
    # bad lines were dropped by _decode_lines; numbering stays that of the file
    text = "\n".join(t for _, t in lines)
    reader = csv.DictReader(io.StringIO(text))
    rows = []
    line_of = [n for n, _ in lines]
    try:
        for record in reader:
            physical = line_of[min(reader.line_num, len(line_of)) - 1]
            if None in record:
                problems.append(RowProblem(name, physical, "more fields than the header"))
                continue
            rows.append((physical, {k: v for k, v in record.items() if k is not None}))
    except csv.Error as exc:
        problems.append(RowProblem(name, reader.line_num, f"malformed CSV: {exc}"))
    return rows, problems


def _read_parquet(path: Path, name: str) -> tuple[list[tuple[int, Row]], list[RowProblem]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        return [], [RowProblem(name, 1, f"not a readable parquet file: {exc}")]
    return [(i, row) for i, row in enumerate(table.to_pylist(), start=1)], []


HUB_FIX = (
    "download it first on a host with network access: `hf download --repo-type dataset {id}` "
    "(into the cache the nodes share: HF_HOME / HF_HUB_CACHE), or give a local file"
)


def _hub_problem(field_name: str, message: str, fix: str, value: str) -> RecipeError:
    return RecipeError([Problem(field_name, message, fix, value)], "data")


STREAM_SHARDS = 64  # a stream made of a datasets-cache Arrow table: shards for ranks, workers


def _load_offline(
    dataset_id: str,
    subset: str | None,
    split: str,
    data_dir: str | None = None,
    streaming: bool = False,
) -> Any:
    """The split of a hub dataset without any network: from its snapshot in the hub cache
    (what `hf download --repo-type dataset` leaves), else from the datasets cache of an earlier
    `datasets.load_dataset` (HF_DATASETS_CACHE). LookupError when it is in neither. streaming:
    a datasets.IterableDataset (the snapshot's files streamed, one shard each; a datasets-cache
    table, already Arrow on disk, iterated in STREAM_SHARDS shards)."""
    import datasets
    import huggingface_hub
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(dataset_id, repo_type="dataset", local_files_only=True)
    except (huggingface_hub.errors.LocalEntryNotFoundError, ValueError):
        folder = None
    if folder is not None:
        return datasets.load_dataset(
            folder, subset, split=split, data_dir=data_dir, streaming=streaming
        )
    # offline for this call even when the environment says otherwise: never a network wait
    offline, datasets.config.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE, True
    try:
        table = datasets.load_dataset(dataset_id, subset, split=split, data_dir=data_dir)
        if not streaming:
            return table
        return table.to_iterable_dataset(num_shards=max(1, min(STREAM_SHARDS, len(table))))
    except (ConnectionError, FileNotFoundError) as exc:
        raise LookupError(str(exc)) from None
    finally:
        datasets.config.HF_HUB_OFFLINE = offline


def _read_hub(
    dataset_id: str, subset: str | None, split: str, field_name: str, data_dir: str | None = None
) -> list[tuple[int, Row]]:
    """A hub dataset's rows, read offline from the local Hugging Face cache."""
    rows = open_hub(dataset_id, subset, split, field_name, data_dir)
    return [(i, dict(row)) for i, row in enumerate(rows, start=1)]


def open_hub(
    dataset_id: str,
    subset: str | None,
    split: str,
    field_name: str,
    data_dir: str | None = None,
    *,
    streaming: bool = False,
) -> Any:
    """A hub dataset's split from the local Hugging Face cache (a datasets.Dataset, or for
    `streaming` an IterableDataset); RecipeError naming the `hf download` when it is not
    there or cannot be read."""
    if dataset_id.count("/") > 1 or dataset_id.startswith(("/", ".", "~")):
        raise _hub_problem(
            field_name,
            "neither a local data file nor a hub dataset id (owner/name)",
            "check the path (jsonl, json, csv or parquet) or the dataset id",
            dataset_id,
        )
    try:
        return _load_offline(dataset_id, subset, split, data_dir, streaming)
    except LookupError:
        raise _hub_problem(
            field_name,
            f"hub dataset {dataset_id} is not in the Hugging Face cache (datasets are read "
            "offline)",
            HUB_FIX.format(id=dataset_id),
            dataset_id,
        ) from None
    except ValueError as exc:  # an unknown subset or split, a bad slice
        raise _hub_problem(
            field_name,
            f"cannot read {dataset_id} (subset {subset or 'default'}, split {split}): "
            f"{str(exc)[:300]}",
            "name a subset and a split the dataset has (a slice as train[:20%])",
            dataset_id,
        ) from None
    except Exception as exc:  # a corrupt or unreadable cache: all the same to a user
        raise _hub_problem(
            field_name,
            f"cannot read {dataset_id}: {type(exc).__name__}: {str(exc)[:200]}",
            HUB_FIX.format(id=dataset_id),
            dataset_id,
        ) from None


def read_rows(
    source: str,
    field_name: str = "data.train",
    *,
    subset: str | None = None,
    split: str = "train",
    data_dir: str | None = None,
) -> tuple[list[tuple[int, Row]], list[RowProblem]]:
    """(row number, row) pairs and unreadable rows. RecipeError: missing or empty file, a hub
    dataset not in the local cache. `subset`, `split` and `data_dir` are a hub dataset's."""
    if not is_local(source) and not Path(source).exists():
        return _read_hub(source, subset, split, field_name, data_dir), []
    path = Path(source).expanduser()
    if path.is_dir():
        raise RecipeError(
            [
                Problem(
                    field_name,
                    f"{path} is a directory, not a data file",
                    "name a jsonl/json/csv/parquet file",
                    source,
                )
            ],
            "data",
        )
    if not path.is_file():
        raise RecipeError(
            [Problem(field_name, f"data file not found: {path}", "check the path", source)], "data"
        )
    raw = path.read_bytes()
    if not raw.strip():
        raise RecipeError(
            [Problem(field_name, f"data file is empty: {path}", "give a file with rows", source)],
            "data",
        )
    name = path.name
    suffix = path.suffix.lower()
    encoding = next((enc for bom, enc in _BOMS.items() if raw.startswith(bom)), None)
    if encoding and suffix != ".parquet":
        return [], [RowProblem(name, 1, f"the file is {encoding}; re-save it as UTF-8")]
    if suffix == ".csv":
        rows, problems = _read_csv(raw, name)
    elif suffix == ".parquet":
        rows, problems = _read_parquet(path, name)
    elif suffix == ".json" and not raw.lstrip().startswith(b"{"):
        rows, problems = _read_json(raw, name)
    elif suffix == ".json":  # a .json file holding one object per line is common
        rows, problems = _read_jsonl(raw, name)
        if problems and not rows:
            rows, problems = _read_json(raw, name)
    else:
        rows, problems = _read_jsonl(raw, name)
    if not rows and not problems:
        raise RecipeError(
            [Problem(field_name, f"no rows in {path}", "give a file with rows", source)], "data"
        )
    return rows, problems
