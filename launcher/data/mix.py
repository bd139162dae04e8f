"""Several training sources mixed into one training set (data.train as a list of sources).

Pure and deterministic: the launcher and every rank compute the same mix from the same rows and
data.seed; another seed gives another mix. Without weights every row of every source is used
once. With weights (every source has one; rules refuse a partial set) the mix keeps the total
number of rows and gives each source its share of it, `total * weight / sum(weights)`, rounded
so that the shares add up: a source with fewer rows than its share is repeated (every row as
often as it fits whole, the rest a seeded sample), one with more is sampled without
replacement. Several sources are then shuffled together (data.seed), so that data.max_samples
takes a sample of the mix, not the first source; a single source keeps its order.
"""

from __future__ import annotations

import math
import random
from typing import Any

Row = dict[str, Any]


def shares(total: int, weights: list[float]) -> list[int]:
    """`total` split in proportion to `weights`, by largest remainder (sums to `total`)."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _take(rows: list[Row], count: int, rng: random.Random) -> list[int]:
    """Indices of `count` rows: whole passes over `rows`, then a seeded sample of the rest."""
    whole, rest = divmod(count, len(rows))
    return list(range(len(rows))) * whole + sorted(rng.sample(range(len(rows)), rest))


def mix(parts: list[list[Row]], weights: list[float | None], seed: int) -> list[tuple[int, Row]]:
    """(source index, row) of the training mix; `parts` are each source's training rows."""
    if len(parts) == 1:
        return [(0, row) for row in parts[0]]
    total = sum(len(rows) for rows in parts)
    given = [w for w in weights if w is not None]
    counts = shares(total, given) if len(given) == len(parts) else [len(p) for p in parts]
    rng = random.Random(seed)
    mixed = [
        (i, rows[j])
        for i, (rows, n) in enumerate(zip(parts, counts, strict=True))
        for j in _take(rows, n, rng)
    ]
    rng.shuffle(mixed)
    return mixed
