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

ALPACA = ChatTemplate(
    "alpaca",
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'assistant' %}### Response:\n{{ m['content'] }}{{ eos_token }}\n\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}### Response:\n{% endif %}",
    (),
    "",  # the tokenizer's own EOS ends a response
)

TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in (CHATML, LLAMA3, ALPACA)}
