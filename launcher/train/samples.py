"""train.log_samples: which rows of the training set each optimizer step used.

Every rank appends one JSON line per micro-batch to RUN_DIR/logs/samples-rank{N}.jsonl:
{"step": S, "rows": [...]}, S the optimizer step the micro-batch belongs to, each row the
index of the trainer's training row (after tokenization and packing) whose tokens the
micro-batch carried, found by a hash of those tokens. Together, the files of all ranks say
which rows every step trained, whatever the world size: a resume on another number of
processes can be checked to train each row of an epoch once. A resumed run first drops the
lines after the step it resumes from (rank 0, for the files of every rank, old world sizes
included), as metrics.jsonl does.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import IO, Any

from launcher.rundir import RunDir


def row_key(tokens: list[int]) -> str:
    return hashlib.sha1(json.dumps(tokens).encode()).hexdigest()[:16]


def sequences(inputs: dict[str, Any]) -> list[list[int]]:
    """The token sequences of a collated micro-batch: rows without their padding, or under
    padding-free packing (one row, no attention mask) the segments position_ids restarts."""
    ids = inputs.get("input_ids")
    if ids is None:
        return []
    ids = ids.tolist()
    mask = inputs.get("attention_mask")
    positions = inputs.get("position_ids")
    if mask is None and positions is not None and len(ids) == 1:
        starts = [i for i, p in enumerate(positions.tolist()[0]) if p == 0] + [len(ids[0])]
        return [ids[0][a:b] for a, b in itertools.pairwise(starts) if b > a]
    if mask is None:
        return ids
    return [
        [t for t, m in zip(row, keep, strict=True) if m]
        for row, keep in zip(ids, mask.tolist(), strict=True)
    ]


class SampleLog:
    """One rank's log of the rows it trained."""

    def __init__(self, run: RunDir, rank: int, dataset: Any) -> None:
        self.index: dict[str, int] = {}
        # a stream (no length) is not indexed: its rows are logged by their tokens' key
        indexed = dataset is not None and hasattr(dataset, "__len__")
        if indexed and "input_ids" in dataset.column_names:
            for i, tokens in enumerate(dataset["input_ids"]):
                self.index.setdefault(row_key(list(tokens)), i)
        run.logs.mkdir(parents=True, exist_ok=True)
        self._fh: IO[str] = run.samples_log(rank).open("a", encoding="utf-8")

    def record(self, step: int, inputs: dict[str, Any]) -> None:
        rows: list[int | str] = []
        for tokens in sequences(inputs):
            key = row_key(tokens)
            rows.append(self.index.get(key, key))
        self._fh.write(json.dumps({"step": step, "rows": rows}) + "\n")
        self._fh.flush()


def rewind(run: RunDir, step: int) -> None:
    """Drop the lines of every rank's file logged after `step` (rank 0, before training)."""
    for path in run.samples_logs():
        kept = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                if int(json.loads(line)["step"]) <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
        RunDir.write_atomic(path, "".join(kept))


def steps_to_rows(run: RunDir) -> dict[int, list[int | str]]:
    """Every step's rows, over all ranks' files (sorted within a step)."""
    by_step: dict[int, list[Any]] = {}
    for path in run.samples_logs():
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            by_step.setdefault(int(record["step"]), []).extend(record["rows"])
    return {s: sorted(rows, key=str) for s, rows in sorted(by_step.items())}
