"""The rules of data.streaming, run from the one list in rules.py: what a stream cannot honour
is refused, never trained some other way. A stream has no length until it is read to its end,
so nothing may need one (a step count from epochs, a held-out fraction, a mix's shares, a
slice in percent); and only the text format is streamed (launcher/data/stream.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from launcher.errors import Problem

if TYPE_CHECKING:
    from launcher.config.rules import Candidate

STREAMED_FORMATS = ("text",)
NOT_STREAMED = "set data.streaming=false (the data is then read whole first)"


def streaming_needs_a_length_free_recipe(c: Candidate) -> list[Problem]:
    """data.streaming with a setting that needs the number of rows ahead, or that the
    stream does not implement (train.evals_per_epoch, which needs epochs, is refused with
    max_steps by rules_train.evals_per_epoch_counts_epochs)."""
    data, train = c.recipe.data, c.recipe.train
    if not data.streaming:
        return []
    problems = []
    if train.max_steps is None:
        problems.append(
            Problem(
                "train.max_steps",
                "required with data.streaming: a stream has no length to count epochs over",
                "set train.max_steps (the optimizer steps to train), or " + NOT_STREAMED,
                None,
            )
        )
    if data.format not in STREAMED_FORMATS:
        problems.append(
            Problem(
                "data.format",
                f"data.streaming streams {', '.join(STREAMED_FORMATS)} data (continued "
                f"pretraining), not {data.format}",
                NOT_STREAMED,
                data.format,
            )
        )
    if data.val_split > 0 and not data.validation:
        problems.append(
            Problem(
                "data.val_split",
                "a held-out fraction of a stream needs its length",
                "give data.validation (a validation source, read whole) or "
                "data.val_split=0, or " + NOT_STREAMED,
                data.val_split,
            )
        )
    if data.num_proc is not None:
        problems.append(
            Problem(
                "data.num_proc",
                "a stream is tokenized in the rank as it is read, not by a pool of processes",
                "remove it (train.dataloader_workers reads a stream in worker processes)",
                data.num_proc,
            )
        )
    return problems + _source_problems(c)


def _source_problems(c: Candidate) -> list[Problem]:
    """One training source (no mix of several), and no split slice (a percent needs a
    length; max_samples caps a stream)."""
    data = c.recipe.data
    sources = data.train_sources()
    if len(sources) > 1:
        return [
            Problem(
                "data.train",
                f"{len(sources)} sources: mixing sources is not implemented for a stream",
                "stream one source, or " + NOT_STREAMED,
                [s.path for s in sources],
            )
        ]
    field = "data.train" if isinstance(data.train, str) else "data.train.0"
    if "[" not in sources[0].split:
        return []
    return [
        Problem(
            f"{field}.split",
            "a slice of a streamed split (a percent needs the split's length)",
            "name the whole split and cap the rows with max_samples, or " + NOT_STREAMED,
            sources[0].split,
        )
    ]


def shuffle_buffer_is_a_streams(c: Candidate) -> list[Problem]:
    """data.shuffle_buffer shuffles a stream; data read whole is shuffled by the trainer's
    sampler, so the setting would do nothing there."""
    data = c.recipe.data
    if data.streaming or data.shuffle_buffer is None:
        return []
    return [
        Problem(
            "data.shuffle_buffer",
            "shuffles a stream; without data.streaming the trainer shuffles the whole data",
            "remove it, or set data.streaming=true",
            data.shuffle_buffer,
        )
    ]
