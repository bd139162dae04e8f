"""The data-format registry: one object per `data.format`, found by name.

Each format knows what a valid row holds (`problem`), the row its trainer takes (`convert`),
a synthetic row for smoke runs (`example`), and the facts the plan and the rank ask about it
(which trainer, which task, whether it needs a chat template, whether it packs). Adding a
format is adding one object to FORMATS; nothing else branches on the format's name.

Pure Python: the plan imports this on the submitting host without torch.

    alpaca          instruction (str), input (str, optional), output (str, non-empty)
    messages        messages: [{role, content}, ...] ending with an assistant turn
    text            <text_column>: str  (continued pretraining)
    preference      prompt, chosen, rejected: str or message lists (DPO); chosen/rejected may
                    repeat the prompt's turns first (Argilla/UltraFeedback), stripped;
                    system (str, optional): a system turn before the prompt
    classification  <text_column>: str, <label_column>: int in [0, num_labels) or str
    kto             prompt, completion: str or message lists; label: bool (true: the
                    completion is desirable) - unpaired rows (KTO); system as preference;
                    or messages (its last turn the completion) and label
    reward          prompt, chosen, rejected as for preference: pairs a reward model scores

Rows given to the trainers: alpaca and messages become conversational prompt/completion
(the completion is the last assistant turn; evaluation reads them so), which the rank then
tokenizes with a loss mask over every assistant turn (launcher/data/turns.py); preference
becomes conversational prompt/chosen/rejected, text stays {"text"}, classification
{"text", "label"}, kto conversational prompt/completion with its bool label, reward as
preference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from launcher.config.recipe import DataConfig

Row = dict[str, Any]
ROLES = ("system", "user", "assistant", "tool")
Trainer = Literal["sft", "dpo", "classification", "kto", "reward"]
Task = Literal["causal_lm", "sequence_classification"]


@dataclass(frozen=True)
class Example:
    """One synthetic item a format writes as a row (smoke runs): a toy sentiment task."""

    question: str
    text: str
    label: str
    wrong: str


@dataclass(frozen=True)
class DataFormat:
    name: str
    # sft: TRL SFTTrainer; dpo: pairs for train.preference_loss (DPO, ORPO, SimPO); kto: TRL
    # KTOTrainer; reward: TRL RewardTrainer; classification: transformers' Trainer (the plan's
    # objective, launcher/config/methods.py)
    trainer: Trainer
    task: Task  # the model.task it trains
    chat: bool  # rows go through the tokenizer's chat template
    packable: bool  # data.packing applies
    completion_only: bool  # data.completion_only_loss applies (there is a prompt to mask)
    turns: bool  # conversations: the rank tokenizes them, every assistant turn trained (turns.py)
    problem: Callable[[Row, DataConfig, int | None], str | None]  # why a row is invalid
    convert: Callable[[Row, DataConfig, dict[str, int] | None], Row]  # the trainer's row
    example: Callable[[Example, DataConfig], Row]  # a synthetic row (smoke)


# --------------------------------------------------------------------------------------------
# Checks shared by the formats


def _text_problem(
    row: Row, key: str, *, required: bool = True, non_empty: bool = True
) -> str | None:
    if key not in row or row[key] is None:
        return f"missing field {key!r}" if required else None
    value = row[key]
    if not isinstance(value, str):
        return f"field {key!r} must be a string (got {type(value).__name__})"
    if non_empty and not value.strip():
        return f"empty {key!r}"
    return None


def _messages_problem(value: Any, key: str, *, last_assistant: bool) -> str | None:
    if not isinstance(value, list) or not value:
        return f"{key!r} must be a non-empty list of {{role, content}} messages"
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return f"{key}[{i}] must be an object with 'role' and 'content'"
        if message["role"] not in ROLES:
            return f"{key}[{i}].role {message['role']!r} is not one of {', '.join(ROLES)}"
        if not isinstance(message["content"], str):
            return f"{key}[{i}].content must be a string"
    if last_assistant:
        if value[-1]["role"] != "assistant":
            return f"the last message of {key!r} must be the assistant's (it is trained on)"
        if not value[-1]["content"].strip():
            return f"empty assistant message at the end of {key!r}"
    return None


def _turn_problem(row: Row, key: str, *, completion: bool) -> str | None:
    """A string, a list of {role, content} turns, or one such turn as an object (LLaMA-Factory's
    and axolotl's preference pairs give each answer as one message)."""
    if key not in row or row[key] is None:
        return f"missing field {key!r}"
    value = row[key]
    if isinstance(value, str):
        return f"empty {key!r}" if not value.strip() else None
    if isinstance(value, dict):
        value = [value]
    return _messages_problem(value, key, last_assistant=completion)


def _as_turns(value: Any, role: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    return [{"role": m["role"], "content": m["content"]} for m in value]


def class_label(value: Any) -> Any:
    """A label as read: CSV gives integers as strings."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


# --------------------------------------------------------------------------------------------
# alpaca


def _alpaca_problem(row: Row, data: DataConfig, num_labels: int | None) -> str | None:
    return (
        _text_problem(row, "instruction")
        or _text_problem(row, "input", required=False, non_empty=False)
        or _text_problem(row, "output")
    )


def _alpaca_convert(row: Row, data: DataConfig, labels: dict[str, int] | None) -> Row:
    from launcher.data.templates import alpaca_turns

    return {
        "prompt": alpaca_turns(row["instruction"], row.get("input") or "", data.alpaca_prompt),
        "completion": [{"role": "assistant", "content": row["output"]}],
    }


# --------------------------------------------------------------------------------------------
# messages


def _messages_row_problem(row: Row, data: DataConfig, num_labels: int | None) -> str | None:
    if "messages" not in row:
        return "missing field 'messages'"
    return _messages_problem(row["messages"], "messages", last_assistant=True)


def _messages_convert(row: Row, data: DataConfig, labels: dict[str, int] | None) -> Row:
    messages = _as_turns(row["messages"], "user")
    return {"prompt": messages[:-1], "completion": messages[-1:]}


# --------------------------------------------------------------------------------------------
# text


def _text_row_problem(row: Row, data: DataConfig, num_labels: int | None) -> str | None:
    return _text_problem(row, data.text_column)


def _text_convert(row: Row, data: DataConfig, labels: dict[str, int] | None) -> Row:
    return {"text": row[data.text_column]}


# --------------------------------------------------------------------------------------------
# preference


def _answer_turns(row: Row, key: str) -> tuple[list[dict[str, str]], str | None]:
    """The turns of `chosen`/`rejected` after the prompt. A full conversation that repeats the
    prompt (the Argilla / UltraFeedback shape) has the repeat stripped, once checked to be the
    prompt turn for turn: DPO would otherwise train on a prompt given twice."""
    prompt, turns = _as_turns(row["prompt"], "user"), _as_turns(row[key], "assistant")
    if turns[0]["role"] == "assistant":
        return turns, None
    head = turns[: len(prompt)]
    same = len(head) == len(prompt) and all(
        a["role"] == b["role"] and a["content"].strip() == b["content"].strip()
        for a, b in zip(head, prompt, strict=True)
    )
    if not same or len(turns) == len(prompt):
        return turns, (
            f"{key!r} starts with a {turns[0]['role']} turn that is not a repeat of 'prompt': "
            f"give {key!r} as the answer turns only, or as the prompt's turns followed by them"
        )
    return turns[len(prompt) :], None


def _prompt_turns(row: Row) -> list[dict[str, str]]:
    """The prompt's turns of a pair or KTO row, a `system` column first (Argilla's and
    axolotl's pairs; absent, null or empty: no system turn, as axolotl reads it)."""
    turns = _as_turns(row["prompt"], "user")
    if row.get("system"):
        turns = [{"role": "system", "content": row["system"]}, *turns]
    return turns


def _system_problem(row: Row) -> str | None:
    system = row.get("system")
    if system is None or system == "":
        return None
    if not isinstance(system, str):
        return f"'system' must be a string (got {type(system).__name__})"
    if _as_turns(row["prompt"], "user")[0]["role"] == "system":
        return "a 'system' column and a system turn in 'prompt': give the system prompt once"
    return None


def _preference_problem(row: Row, data: DataConfig, num_labels: int | None) -> str | None:
    problem = (
        _turn_problem(row, "prompt", completion=False)
        or _system_problem(row)
        or _turn_problem(row, "chosen", completion=True)
        or _turn_problem(row, "rejected", completion=True)
        or _answer_turns(row, "chosen")[1]
        or _answer_turns(row, "rejected")[1]
    )
    if problem is None and _answer_turns(row, "chosen") == _answer_turns(row, "rejected"):
        problem = "'chosen' equals 'rejected': no preference to learn"
    return problem


def _preference_convert(row: Row, data: DataConfig, labels: dict[str, int] | None) -> Row:
    return {
        "prompt": _prompt_turns(row),
        "chosen": _answer_turns(row, "chosen")[0],
        "rejected": _answer_turns(row, "rejected")[0],
    }


# --------------------------------------------------------------------------------------------
# classification


def _classification_problem(row: Row, data: DataConfig, num_labels: int | None) -> str | None:
    problem = _text_problem(row, data.text_column)
    if problem:
        return problem
    if data.label_column not in row or row[data.label_column] is None:
        return f"missing field {data.label_column!r}"
    label = row[data.label_column]
    if isinstance(label, bool) or not isinstance(label, int | str):
        return f"label must be an integer or a string (got {type(label).__name__})"
    label = class_label(label)
    if isinstance(label, str) and not label.strip():
        return "empty label"
    if isinstance(label, int) and num_labels is not None and not 0 <= label < num_labels:
        return f"label {label} is outside 0..{num_labels - 1} (model.num_labels={num_labels})"
    return None


def _classification_convert(row: Row, data: DataConfig, labels: dict[str, int] | None) -> Row:
    label = class_label(row[data.label_column])
    if isinstance(label, str):
        if labels is None:
            raise ValueError("string labels need a label mapping")
        label = labels[label.strip()]
    return {"text": row[data.text_column], "label": int(label)}


# --------------------------------------------------------------------------------------------
# kto


def _kto_row(row: Row) -> Row:
    """A KTO row given as one conversation (`messages` and `label`, no `completion`:
    LLaMA-Factory's kto_en_demo) as prompt/completion: the last turn is the completion, the
    turns before it the prompt."""
    if "completion" in row or "prompt" in row or not isinstance(row.get("messages"), list):
        return row
    return {**row, "prompt": row["messages"][:-1], "completion": row["messages"][-1:]}


def _kto_problem(row: Row, data: DataConfig, num_labels: int | None) -> str | None:
    if "completion" not in row and "prompt" not in row and "messages" in row:
        problem = _messages_problem(row["messages"], "messages", last_assistant=True)
        if problem or len(row["messages"]) < 2:
            return problem or "'messages' needs the prompt's turns before the completion"
        row = _kto_row(row)
    problem = (
        _turn_problem(row, "prompt", completion=False)
        or _system_problem(row)
        or _turn_problem(row, "completion", completion=True)
    )
    if problem:
        return problem
    if "label" not in row or row["label"] is None:
        return "missing field 'label' (true: the completion is desirable, false: undesirable)"
    if not isinstance(row["label"], bool):
        return f"'label' must be true or false (got {row['label']!r})"
    return None


def _kto_convert(row: Row, data: DataConfig, labels: dict[str, int] | None) -> Row:
    row = _kto_row(row)
    return {
        "prompt": _prompt_turns(row),
        "completion": _as_turns(row["completion"], "assistant"),
        "label": row["label"],
    }


# --------------------------------------------------------------------------------------------
# The registry


FORMATS: dict[str, DataFormat] = {
    f.name: f
    for f in (
        DataFormat(
            name="alpaca",
            trainer="sft",
            task="causal_lm",
            chat=True,
            packable=True,
            completion_only=True,
            turns=True,
            problem=_alpaca_problem,
            convert=_alpaca_convert,
            example=lambda e, d: {"instruction": e.question, "input": e.text, "output": e.label},
        ),
        DataFormat(
            name="messages",
            trainer="sft",
            task="causal_lm",
            chat=True,
            packable=True,
            completion_only=True,
            turns=True,
            problem=_messages_row_problem,
            convert=_messages_convert,
            example=lambda e, d: {
                "messages": [
                    {"role": "user", "content": f"{e.question} {e.text}"},
                    {"role": "assistant", "content": e.label},
                ]
            },
        ),
        DataFormat(
            name="text",
            trainer="sft",
            task="causal_lm",
            chat=False,
            packable=True,
            completion_only=False,
            turns=False,
            problem=_text_row_problem,
            convert=_text_convert,
            example=lambda e, d: {d.text_column: f"{e.text}, so it was {e.label}."},
        ),
        DataFormat(
            name="preference",
            trainer="dpo",
            task="causal_lm",
            chat=True,
            packable=False,
            completion_only=False,
            turns=False,
            problem=_preference_problem,
            convert=_preference_convert,
            example=lambda e, d: {
                "prompt": f"{e.question} {e.text}",
                "chosen": e.label,
                "rejected": e.wrong,
            },
        ),
        DataFormat(
            name="classification",
            trainer="classification",
            task="sequence_classification",
            chat=False,
            packable=False,
            completion_only=False,
            turns=False,
            problem=_classification_problem,
            convert=_classification_convert,
            example=lambda e, d: {d.text_column: e.text, d.label_column: e.label},
        ),
        DataFormat(
            name="kto",
            trainer="kto",
            task="causal_lm",
            chat=True,
            packable=False,
            completion_only=False,
            turns=False,
            problem=_kto_problem,
            convert=_kto_convert,
            example=lambda e, d: {
                "prompt": f"{e.question} {e.text}",
                "completion": e.label,
                "label": True,
            },
        ),
        DataFormat(
            name="reward",
            trainer="reward",
            task="sequence_classification",
            chat=True,
            packable=False,
            completion_only=False,
            turns=False,
            problem=_preference_problem,
            convert=_preference_convert,
            example=lambda e, d: {
                "prompt": f"{e.question} {e.text}",
                "chosen": e.label,
                "rejected": e.wrong,
            },
        ),
    )
}


def get_format(name: str) -> DataFormat:
    """The format named `name` (the recipe schema admits only registered names)."""
    return FORMATS[name]
