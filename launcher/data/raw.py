"""A source's raw rows as an Arrow file of (line number, raw bytes), the input of the one
`datasets.map` pass of launcher/data/prepare.py.

A local .jsonl is streamed line by line and parsed in the map workers (files.py's own line
reader, so its problems and line numbers are the same); any other source (json, csv, parquet,
a hub dataset) is read by `files.read_rows` and its rows handed to the workers with the map's
arguments (`raw` then empty).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher.config.schema import DataSource
from launcher.data.files import RowProblem, _read_jsonl, is_local, read_rows
from launcher.data.formats import Row

WRITE_BATCH = 10_000  # raw lines per Arrow record batch


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


def raw_dataset(
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


def parsed(
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
