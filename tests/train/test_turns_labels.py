"""What a rank trains on for a multi-turn chat: the labels SFTTrainer builds from the rank's
own data path (launcher/train/data.py) cover every assistant turn, not only the last one.
In-process, one process, a tiny Llama; nothing is trained (the labels are the outcome)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .conftest import rank_trainer

pytestmark = pytest.mark.train

QUESTIONS = [("is the food good?", "positive"), ("was the film awful?", "negative")] * 4


def chats(path: Path) -> Path:
    rows = [
        {
            "messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": a},
                {"role": "user", "content": "thanks"},
                {"role": "assistant", "content": "goodbye"},
            ]
        }
        for q, a in QUESTIONS
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trainer_labels(tmp_path: Path, *overrides: str) -> tuple[Any, Any, list[str]]:
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(
        "name: turns\nmodel: {name_or_path: 'tiny:llama', dtype: fp32}\n"
        f"data: {{train: {chats(tmp_path / 'chats.jsonl')}, format: messages, max_seq_len: 64}}\n"
        "train: {precision: fp32, max_steps: 1, global_batch_size: 8, micro_batch_size: 8}\n"
        "resources: {accelerator: gpu}\n"  # a CPU plan's gloo arguments need a process group
    )
    tokenizer, trainer = rank_trainer(recipe_file, *overrides, model_loss=True)
    trained = [
        tokenizer.decode([t for t in row["labels"] if t != -100]) for row in trainer.train_dataset
    ]
    return tokenizer, trainer, trained


def test_every_assistant_turn_is_in_the_labels(tmp_path: Path) -> None:
    _, _, trained = trainer_labels(tmp_path)
    assert len(trained) == len(QUESTIONS)
    for text, (_, answer) in zip(trained, QUESTIONS, strict=True):
        assert text == f"{answer}<|end|>\ngoodbye<|end|>\n"


def test_last_turn_only_when_asked(tmp_path: Path) -> None:
    _, _, trained = trainer_labels(tmp_path, "data.assistant_turns=last")
    assert set(trained) == {"goodbye<|end|>\n"}


def test_a_named_template_reaches_the_model(tmp_path: Path) -> None:
    """chatml: its tokens added (embeddings resized), its end of turn trained and made EOS,
    and generation stops there."""
    tokenizer, trainer, trained = trainer_labels(tmp_path, "data.chat_template=chatml")
    assert trained[0] == "positive<|im_end|>\ngoodbye<|im_end|>\n"
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model = (
        trainer.model.get_base_model()
        if hasattr(trainer.model, "get_base_model")
        else trainer.model
    )
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer) > end
    assert end in model.generation_config.eos_token_id
