"""data.streaming: the training source as a `datasets.IterableDataset`, read, checked,
tokenized and packed as training consumes it, never read whole nor counted ahead.

Rank side (`train_stream`): the source opened streaming (a local jsonl/json/csv/parquet file
through datasets' packaged builder; a hub dataset from the local cache, files.open_hub), each
row remapped (data.columns) and checked as launcher/data/rows.py checks a row (the format's
problem; data.invalid_rows=error stops the run at the row, drop skips it with a warning), cut
to max_samples, then shuffled through a buffer of the plan's `shuffle_buffer` rows by its
`seed` (datasets reshuffles each pass with seed + epoch, which the Trainer sets). TRL's
SFTTrainer (1.x, `_prepare_dataset`) then adds EOS, tokenizes and packs it lazily: the maps of
an IterableDataset run as batches are drawn, and `pack_dataset` packs them batch by batch into
max_seq_len blocks.

Several ranks: every rank builds the same stream (same seed, same order) and the split is
accelerate's, done when the Trainer prepares its DataLoader; TRL's SFTTrainer forces
dispatch_batches=False for an IterableDataset, so accelerate's prepare_data_loader either
shards the stream (`IterableDataset.shard`, when it has at least WORLD_SIZE shards, e.g. the
files of a hub dataset: each rank reads its own files) or wraps it in IterableDatasetShard
(every rank reads the whole stream and keeps its own slice of each global batch). Either way no
two ranks train the same rows. We rely on that, not on datasets.distributed.
split_dataset_by_node, which accelerate would then split a second time.

Launcher side (`check_stream`, before any process starts): the source opens (a hub dataset not
in the cache is a RecipeError naming the `hf download` that fetches it) and its first HEAD rows
are checked; data.validation sources are read whole and checked as ever. The data report
(`StreamReport`) says what was checked and that the stream's rows are not counted.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.config.schema import DataConfig, DataSource, Recipe
from launcher.data import rows
from launcher.data.files import RowProblem, is_local, open_hub
from launcher.data.formats import Row, get_format
from launcher.data.mapping import remap
from launcher.errors import Problem, RecipeError

if TYPE_CHECKING:
    from launcher.data.prepare import Prepared

log = logging.getLogger(__name__)

HEAD = 100  # rows of a stream checked before training (by the launcher, and by rank 0)
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
PROBLEM = "__problem__"  # the checked row's problem (None: valid), dropped before training


@dataclass
class StreamReport(rows.DataReport):
    """The data report of a streamed source: `read` and `valid` count only its first rows,
    checked before training; how many rows it has is not known, and not said."""

    shuffle_buffer: int = 0
    max_samples: int | None = None

    def summary(self) -> str:
        parts = [
            f"{self.source} ({self.role}): streamed, rows not counted",
            f"first {self.read} checked, {len(self.problems)} invalid",
            f"at most {self.max_samples} rows" if self.max_samples else "every row",
            f"shuffled through {self.shuffle_buffer} rows"
            if self.shuffle_buffer
            else "in the source's order",
        ]
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "role": self.role,
            "streamed": True,
            "rows": None,  # not known: the stream is read as training consumes it
            "checked_first_rows": self.read,
            "invalid_in_checked": len(self.problems),
            "max_samples": self.max_samples,
            "shuffle_buffer": self.shuffle_buffer,
            "problems": [p.render() for p in self.problems[: rows.MAX_LISTED]],
        }


def open_stream(source: DataSource, field_name: str) -> Any:
    """The source as a datasets.IterableDataset of its raw rows (nothing read yet)."""
    import datasets

    if not is_local(source.path) and not Path(source.path).exists():
        return open_hub(
            source.path,
            source.subset,
            source.split,
            field_name,
            source.data_dir,
            streaming=True,
        )
    path = Path(source.path).expanduser()
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None or not path.is_file() or path.stat().st_size == 0:
        raise RecipeError(
            [
                Problem(
                    field_name,
                    f"{path} is not a non-empty jsonl/json/csv/parquet file",
                    "check the path",
                    source.path,
                )
            ],
            "data",
        )
    return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)


def shard_count(recipe: Recipe) -> int:
    """How many shards data.train's stream has (a local file: 1; a hub dataset: its files),
    which decides how accelerate splits it between ranks (launcher/config/resume_stream.py)."""
    source = recipe.data.train_sources()[0]
    field_name = rows._field("data.train", recipe.data.train, 0)
    return int(open_stream(source, field_name).n_shards)


def _check(row: Row, *, data: DataConfig) -> Row:
    """A raw row -> {"text": its trainer text, PROBLEM: why it is invalid, or None}."""
    row = remap(row, data)
    problem = rows.row_problem(row, data, None, None)
    if problem is not None:
        return {"text": "", PROBLEM: problem}
    return {"text": get_format(data.format).convert(row, data, None)["text"], PROBLEM: None}


def checked_rows(source: DataSource, data: DataConfig, field_name: str) -> Any:
    """The source's rows as {"text", PROBLEM}, checked as they are read."""
    own = data.model_copy(update={"columns": source.columns}) if source.columns else data
    stream = open_stream(source, field_name)
    return stream.map(_check, fn_kwargs={"data": own}).select_columns(["text", PROBLEM])


def _keep(row: Row, index: int, *, name: str, field_name: str, policy: str) -> bool:
    """data.invalid_rows on one checked row: keep it, drop it (a warning), or stop."""
    problem = row[PROBLEM]
    if problem is None:
        return True
    where = f"{name}: row {index + 1} as this process read the stream"
    if policy == "error":
        fix = "fix or remove the row, or set data.invalid_rows=drop to skip such rows"
        raise RecipeError([Problem(field_name, f"{where}: {problem}", fix)], "data")
    log.warning("%s: %s (dropped: data.invalid_rows=drop)", where, problem)
    return False


def row_cap(recipe: Recipe) -> int | None:
    """The fewest rows the stream may give: its source's max_samples and data.max_samples."""
    caps = [recipe.data.max_samples, recipe.data.train_sources()[0].max_samples]
    given = [c for c in caps if c is not None]
    return min(given) if given else None


def train_stream(recipe: Recipe, settings: dict[str, int]) -> Any:
    """data.train as the trainer's IterableDataset of {"text"} rows (the plan's `stream`
    settings: shuffle_buffer, seed); rules_stream.py: one source, the text format."""
    data = recipe.data
    source = data.train_sources()[0]
    field_name = rows._field("data.train", data.train, 0)
    policy = {"name": rows.source_name(source), "field_name": field_name}
    stream = checked_rows(source, data, field_name).filter(
        _keep, with_indices=True, fn_kwargs={**policy, "policy": data.invalid_rows}
    )
    stream = stream.select_columns(["text"])
    cap = row_cap(recipe)
    if cap is not None:
        stream = stream.take(cap)
    if settings["shuffle_buffer"]:
        stream = stream.shuffle(seed=settings["seed"], buffer_size=settings["shuffle_buffer"])
    return stream


def head_report(recipe: Recipe, settings: dict[str, int]) -> StreamReport:
    """The stream's first HEAD rows checked (RecipeError per data.invalid_rows, and when the
    source cannot be opened or read), as its report."""
    data = recipe.data
    source = data.train_sources()[0]
    field_name, name = rows._field("data.train", data.train, 0), rows.source_name(source)
    try:
        head = list(checked_rows(source, data, field_name).take(HEAD))
    except RecipeError:
        raise
    except Exception as exc:  # datasets' readers raise many types for a file they cannot read
        message = f"cannot stream {name}: {type(exc).__name__}: {str(exc)[:300]}"
        fix = "give a jsonl/json/csv/parquet file (or cached hub dataset) datasets can read"
        raise RecipeError([Problem(field_name, message, fix, source.path)], "data") from None
    problems = [RowProblem(name, i, r[PROBLEM]) for i, r in enumerate(head, 1) if r[PROBLEM]]
    report = StreamReport(
        source=name,
        read=len(head),
        valid=len(head) - len(problems),
        problems=problems,
        shuffle_buffer=settings["shuffle_buffer"],
        max_samples=row_cap(recipe),
    )
    rows._fail_or_warn(report, data, field_name)
    return report


def check_stream(recipe: Recipe, settings: dict[str, int]) -> list[rows.DataReport]:
    """Launcher-side check of a streamed recipe: the stream's head, then every validation
    source read whole and checked (rows.check_source, as rows.load_splits does)."""
    data = recipe.data
    reports: list[rows.DataReport] = [head_report(recipe, settings)]
    for i, source in enumerate(data.validation_sources()):
        field_name = rows._field("data.validation", data.validation, i)
        found, report, _ = rows.check_source(source, data, num_labels=None, field_name=field_name)
        rows._fail_or_warn(report, data, field_name)
        reports.append(replace(report, role="validation", used=len(found[: source.max_samples])))
    return reports


def prepare_streamed(
    recipe: Recipe, tokenizer: Any, out: Path, settings: dict[str, int]
) -> Prepared:
    """Rank 0's data of a streamed run: the stream's report, and data.validation read whole,
    checked and tokenized by prepare.py (as training sources of a recipe holding only them)
    into out/validation. A prepare.Prepared without `train`: each rank opens the stream."""
    import datasets

    from launcher.data.prepare import Prepared, prepare_splits

    report = head_report(recipe, settings)
    shutil.rmtree(out, ignore_errors=True)
    data = recipe.data
    if not data.validation:
        out.mkdir(parents=True)
        return Prepared(train=None, validation=None, reports=[report])
    update = {"train": data.validation, "validation": None, "val_split": 0.0,
              "max_samples": None, "streaming": False, "shuffle_buffer": None}  # fmt: skip
    whole = recipe.model_copy(update={"data": data.model_copy(update=update)})
    prepared = prepare_splits(whole, tokenizer, out)
    (out / "train").rename(out / "validation")
    held_out = [replace(r, role="validation", weight=None) for r in prepared.reports]
    return Prepared(
        train=None,
        validation=datasets.load_from_disk(str(out / "validation")),
        reports=[report, *held_out],
    )
