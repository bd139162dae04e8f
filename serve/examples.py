"""Evaluation examples: held-out rows as chat prompts with a reference answer.

Rows are read, validated and split by launcher.data, the code training used, so the held-out
rows are exactly training's validation rows and the prompts are training's prompts:
    eval.data if set, else data.validation, else the data.val_split rows of data.train.
    alpaca:     the prompt turns of data.alpaca_prompt -> output
    messages:   every turn before the last assistant turn -> that turn's content
    preference: the prompt turns -> the chosen answer
Few-shot prompts put eval.few_shot training examples before the question as prior turns.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from launcher.config.recipe import Recipe
from launcher.data.formats import get_format
from launcher.errors import RunError

log = logging.getLogger(__name__)

Message = dict[str, str]


@dataclass(frozen=True)
class Example:
    messages: list[Message]  # the prompt turns
    reference: str

    @property
    def question(self) -> str:
        return self.messages[-1]["content"] if self.messages else ""


def from_trainer_row(row: dict[str, Any]) -> Example:
    """A launcher.data trainer row (prompt + completion, or prompt + chosen) as an Example."""
    answer = row.get("completion") or row.get("chosen") or []
    prompt = [{"role": str(m["role"]), "content": str(m["content"])} for m in row["prompt"]]
    return Example(prompt, str(answer[-1]["content"]) if answer else "")


def eval_data_rows(recipe: Recipe, labels: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """The valid trainer rows of eval.data (the invalid ones skipped with a warning);
    `labels`: training's string-label ids, for classification data."""
    from launcher.data.rows import check_source

    assert recipe.eval.data is not None
    rows, report, _ = check_source(
        recipe.eval.data,
        recipe.data,
        num_labels=recipe.model.num_labels,
        field_name="eval.data",
        labels=labels,
    )
    if report.problems:
        log.warning(
            "eval.data: %d invalid row(s) skipped; first: %s",
            len(report.problems),
            report.problems[0].render(),
        )
    return rows


def held_out(recipe: Recipe) -> tuple[list[Example], list[Example], str]:
    """(evaluation examples, training examples for few-shot, description of the source)."""
    from launcher.data.rows import load_splits

    data, ev = recipe.data, recipe.eval
    if not get_format(data.format).chat:
        raise RunError(
            f"data.format={data.format} has no prompt/answer pairs to evaluate by generation: "
            "evaluation needs alpaca, messages or preference data"
        )
    splits = load_splits(recipe)
    if ev.data:
        rows, source = eval_data_rows(recipe), ev.data
    elif splits.validation:
        rows = splits.validation
        held = ", ".join(s.path for s in data.validation_sources())
        train = ", ".join(s.path for s in data.train_sources())
        source = held or f"{train} (val_split {data.val_split}, seed {data.seed})"
    else:
        raise RunError(
            "no held-out data to evaluate: set eval.data, data.validation or data.val_split"
        )
    examples = [from_trainer_row(r) for r in rows][: ev.max_examples]
    if not examples:
        raise RunError(f"no usable {data.format} examples in {source}")
    return examples, [from_trainer_row(r) for r in splits.train], source


def few_shot_shots(pool: list[Example], k: int, exclude: list[Example]) -> list[Example]:
    """k training examples that are not themselves evaluated, in training order, preferring
    distinct answers first (so a 3-shot prompt of a labelling task shows different labels)."""
    seen = {(json.dumps(e.messages), e.reference) for e in exclude}
    candidates = [e for e in pool if (json.dumps(e.messages), e.reference) not in seen]
    picked: list[Example] = []
    answers: set[str] = set()
    for ex in candidates:
        if len(picked) < k and ex.reference not in answers:
            picked.append(ex)
            answers.add(ex.reference)
    for ex in candidates:
        if len(picked) < k and ex not in picked:
            picked.append(ex)
    return [e for e in candidates if e in picked]


def with_shots(example: Example, shots: list[Example]) -> list[Message]:
    """The example's prompt with the shots as prior user/assistant turns (after any system)."""
    system = [m for m in example.messages[:1] if m["role"] == "system"]
    rest = example.messages[len(system) :]
    prior: list[Message] = []
    for shot in shots:
        prior += [m for m in shot.messages if m["role"] != "system"]
        prior.append({"role": "assistant", "content": shot.reference})
    return system + prior + rest
