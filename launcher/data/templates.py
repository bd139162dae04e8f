"""Named chat templates for data.chat_template: chatml, llama3, alpaca.

A name stands for the Jinja template and the tokens it needs: its special tokens (added to
the tokenizer when missing, the embeddings then resized) and its end-of-turn token, which
becomes the tokenizer's EOS so that generation stops where a turn ends. The template lands
in the tokenizer saved with every checkpoint and in train_contract.json: vLLM serves with
the one training used.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    jinja: str
    special_tokens: tuple[str, ...]  # added to the vocabulary when missing
    end_of_turn: str  # the tokenizer's EOS under this template


CHATML = ChatTemplate(
    "chatml",
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    ("<|im_start|>", "<|im_end|>"),
    "<|im_end|>",
)

LLAMA3 = ChatTemplate(
    "llama3",
    "{{ '<|begin_of_text|>' }}{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
    ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "<|eot_id|>",
)

# the Stanford Alpaca text (axolotl's `alpaca` prompter): BOS, then "{system}\n\n" if any,
# "### Instruction:\n...\n\n### Response:\n" and the answer with EOS; nothing after the last EOS
ALPACA = ChatTemplate(
    "alpaca",
    "{{ bos_token if bos_token else '' }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'assistant' %}### Response:\n{{ m['content'] }}{{ eos_token }}"
    "{% if not loop.last %}\n\n{% endif %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}### Response:\n{% endif %}",
    (),
    "",  # the tokenizer's own EOS ends a response
)

TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in (CHATML, LLAMA3, ALPACA)}


# --------------------------------------------------------------------------------------------
# data.alpaca_prompt: how an alpaca row (instruction, input, output) becomes the prompt turns

# the Stanford Alpaca preamble, with and without an input (tatsu-lab/stanford_alpaca)
PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request."
)
PREAMBLE_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA_PROMPTS = ("joined", "joined_newline", "stanford_system", "stanford_user")


def alpaca_turns(instruction: str, given: str, style: str) -> list[dict[str, str]]:
    """The prompt turns of one alpaca row (`given` is its input, "" when none):

    joined           user: instruction, a blank line, input
    joined_newline   user: instruction, one newline, input (LLaMA-Factory)
    stanford_system  system: the preamble; user: instruction, "\n\n### Input:\n", input
                     (oumi's alpaca datasets; with data.chat_template alpaca: axolotl's text)
    stanford_user    user: the whole Stanford prompt, preamble to "### Response:\n"
                     (torchtune's AlpacaToMessages)
    """
    if style == "joined":
        return [{"role": "user", "content": f"{instruction}\n\n{given}" if given else instruction}]
    if style == "joined_newline":
        return [{"role": "user", "content": f"{instruction}\n{given}" if given else instruction}]
    preamble = PREAMBLE_WITH_INPUT if given else PREAMBLE_NO_INPUT
    user = f"{instruction}\n\n### Input:\n{given}" if given else instruction
    if style == "stanford_system":
        return [{"role": "system", "content": preamble}, {"role": "user", "content": user}]
    if style == "stanford_user":
        text = f"{preamble}\n\n### Instruction:\n{user}\n\n### Response:\n"
        return [{"role": "user", "content": text}]
    raise ValueError(f"unknown alpaca prompt style {style!r}; one of {ALPACA_PROMPTS}")
