"""Conversations tokenized with a loss mask over every assistant turn.

TRL's prompt/completion rows train only the completion: a multi-turn chat given that way
trains its last assistant turn and hides every earlier one in the masked prompt. Peers
(Axolotl, LLaMA-Factory, TRL's own assistant_only_loss) train every assistant turn, so we
tokenize conversations ourselves: `input_ids` plus a `completion_mask` that is 1 on each
assistant turn's tokens. SFTTrainer takes such rows as they are (it skips its own
tokenization when `input_ids` is present) and folds `completion_mask` into the labels when
completion-only loss is on.

Turn boundaries come from the tokenizer's own chat template, rendered once for the whole
conversation and once per assistant turn for the prefix before it (with the generation
prompt) and the prefix through it: the template is used as it is, so the one vLLM serves is
the one training used (TRL's assistant_only_loss would need `{% generation %}` markers added
to it). Rendered text is tokenized without special tokens, as the template spells them and as
vLLM's chat endpoint does.
"""

from __future__ import annotations

from typing import Any

Message = dict[str, str]


class TurnError(ValueError):
    """A conversation whose assistant turn gets no token of its own from the chat template."""


def conversation(row: dict[str, Any]) -> list[Message]:
    """The whole conversation of a chat SFT trainer row (prompt turns + completion turns)."""
    return [*row["prompt"], *row["completion"]]


def _ids(tokenizer: Any, messages: list[Message], generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    return list(tokenizer(str(text), add_special_tokens=False)["input_ids"])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def trained_turns(messages: list[Message], last_only: bool) -> list[int]:
    """Indices of the assistant turns that are trained: all of them, or only the last."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return turns[-1:] if last_only else turns


def tokenize_turns(
    tokenizer: Any, messages: list[Message], *, last_only: bool = False
) -> dict[str, list[int]]:
    """`input_ids` of the rendered conversation and `completion_mask`: 1 on the tokens of each
    trained assistant turn (its content and the template's end-of-turn, as TRL masks a
    completion), 0 elsewhere. TurnError when a trained turn has no token of its own (a
    template that renders earlier turns differently once later turns follow)."""
    full = _ids(tokenizer, messages, False)
    mask = [0] * len(full)
    last = len(messages) - 1
    for i in trained_turns(messages, last_only):
        start = _common_prefix(_ids(tokenizer, messages[:i], True), full)
        end = (
            len(full)
            if i == last
            else _common_prefix(_ids(tokenizer, messages[: i + 1], False), full)
        )
        if end <= start:
            raise TurnError(
                f"assistant turn {i} (messages[{i}]) has no tokens of its own in the rendered "
                "conversation: the chat template renders it differently when later turns follow"
            )
        mask[start:end] = [1] * (end - start)
    return {"input_ids": full, "completion_mask": mask}
