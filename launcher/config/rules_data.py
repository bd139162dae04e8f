"""The data rules (data.format, data.train / data.validation sources), run from the one list
in rules.py. Pure: a source is judged by its path's shape, never by reading it (missing files
are localize's, unreadable data validate_data's)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from launcher.data.files import is_local
from launcher.data.formats import get_format
from launcher.errors import Problem

if TYPE_CHECKING:
    from launcher.config.rules import Candidate


def format_trains_the_task(c: Candidate) -> list[Problem]:
    task, fmt = c.recipe.model.task, get_format(c.recipe.data.format)
    if fmt.task == task:
        return []
    return [
        Problem(
            "data.format",
            f"model.task={task} does not go with data.format={fmt.name}",
            f"data.format={fmt.name} trains model.task={fmt.task}",
            fmt.name,
        )
    ]


def classification_needs_num_labels(c: Candidate) -> list[Problem]:
    model = c.recipe.model
    if model.task != "sequence_classification" or model.num_labels is not None:
        return []
    return [
        Problem(
            "model.num_labels", "required for sequence classification", "set the number of classes"
        )
    ]


def packing_needs_packable_format(c: Candidate) -> list[Problem]:
    fmt = get_format(c.recipe.data.format)
    if not c.recipe.data.packing or fmt.packable:
        return []
    return [
        Problem(
            "data.packing",
            f"packing does not apply to {fmt.name} data",
            "set data.packing=false",
            True,
        )
    ]


def packing_needs_a_length(c: Candidate) -> list[Problem]:
    """Packing fills blocks of data.max_seq_len tokens: without a length there are none."""
    data = c.recipe.data
    if not data.packing or data.max_seq_len is not None:
        return []
    return [
        Problem(
            "data.max_seq_len",
            "null (no truncation) with data.packing: packing fills blocks of max_seq_len tokens",
            "set data.max_seq_len to the block length, or data.packing=false",
            None,
        )
    ]


def weights_given_for_every_source_or_none(c: Candidate) -> list[Problem]:
    """A weight is a share of the mix relative to the others': a source without one has no
    share to compare (and one source alone has nothing to share with)."""
    sources = c.recipe.data.train_sources()
    weighted = [s.weight is not None for s in sources]
    if len(sources) == 1 and weighted[0]:
        return [
            Problem(
                "data.train.0.weight",
                "a weight mixes several sources; with one source it does nothing",
                "remove it, or add the other sources",
                sources[0].weight,
            )
        ]
    if all(weighted) or not any(weighted):
        return []
    return [
        Problem(
            f"data.train.{i}.weight",
            "other sources have a weight and this one has none: its share of the mix is unknown",
            "give every source a weight, or none (then every row is used once)",
            None,
        )
        for i, has in enumerate(weighted)
        if not has
    ]


def validation_sources_are_used_whole(c: Candidate) -> list[Problem]:
    return [
        Problem(
            f"data.validation.{i}.weight",
            "validation sources are not mixed: each is evaluated whole",
            "remove it (its max_samples caps the rows used)",
            source.weight,
        )
        for i, source in enumerate(c.recipe.data.validation_sources())
        if source.weight is not None
    ]


def subset_and_split_are_a_hub_datasets(c: Candidate) -> list[Problem]:
    """A local file has no subsets or splits: they would be ignored, silently."""
    data, problems = c.recipe.data, []
    for name, sources in (
        ("data.train", data.train_sources()),
        ("data.validation", data.validation_sources()),
    ):
        for i, source in enumerate(sources):
            if not is_local(source.path):
                continue
            problems += [
                Problem(
                    f"{name}.{i}.{key}",
                    f"{source.path} is a local file: it has no {key}",
                    "remove it (max_samples caps a source's rows), or name a hub dataset",
                    getattr(source, key),
                )
                for key in ("subset", "data_dir", "split")
                if getattr(source, key) != type(source).model_fields[key].default
            ]
    return problems
