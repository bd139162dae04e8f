"""What the rank's trainer optimises, built from the plan as a rank builds it (tokenizer, data,
TrainingArguments, model, build_trainer) on a tiny Llama, in-process, nothing trained:

- train.weight_decay_exempt: the weight decay of every parameter in the optimizer the trainer
  creates (torchtune's torch.optim.AdamW decays every parameter; the Trainer exempts biases
  and norm weights);
- model.head_dropout: the dropout on the input of a reward model's score layer in training
  mode only (TRL's ValueHead, LLaMA-Factory's stage rm), the head trained in full.

Their refusals (no decay to exempt from, no score layer) are in tests/unit/broken/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .conftest import REPO
from .conftest import rank_trainer as build

DATA = REPO / "recipes" / "data"
SFT = "model: {name_or_path: 'tiny:llama', dtype: fp32}\n" + (
    f"data: {{train: {DATA / 'quickstart_train.jsonl'}, format: alpaca, max_seq_len: 32}}\n"
)
REWARD = (
    "model: {name_or_path: 'tiny:llama', dtype: fp32, task: sequence_classification, "
    "num_labels: 1}\n"
    f"data: {{train: {DATA / 'sentiment_preference.jsonl'}, format: reward, max_seq_len: 32}}\n"
)


def rank_trainer(tmp_path: Path, text: str, *overrides: str) -> Any:
    """The trainer a rank builds for the recipe `text` (a GPU plan in fp32: a CPU plan's gloo
    arguments need a process group)."""
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(
        "name: rank\n" + text + "method: {kind: lora, dropout: 0.0}\n"
        "train: {precision: fp32, max_steps: 1, global_batch_size: 4, micro_batch_size: 4, "
        "trackers: []}\nresources: {accelerator: gpu}\n"
    )
    return build(recipe_file, *overrides)[1]


def decay_by_name(trainer: Any) -> dict[str, float]:
    """The weight decay the trainer's optimizer applies to each trained parameter."""
    optimizer = trainer.create_optimizer()
    decay = {
        id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]
    }
    return {n: decay[id(p)] for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("exempt", ["bias_and_norm", "none"])
def test_which_parameters_decay(tmp_path: Path, exempt: str) -> None:
    sets = ["method.kind=full", "train.weight_decay=0.01", f"train.weight_decay_exempt={exempt}"]
    decay = decay_by_name(rank_trainer(tmp_path, SFT, *sets))
    norms = {n for n in decay if "norm" in n}
    assert norms and "model.norm.weight" in norms  # RMSNorm weights; Llama has no biases
    assert {decay[n] for n in decay if n not in norms} == {0.01}
    assert {decay[n] for n in norms} == ({0.01} if exempt == "none" else {0.0})


def test_reward_head_dropout_in_training_only(tmp_path: Path) -> None:
    import torch

    p = 0.5
    trainer = rank_trainer(tmp_path, REWARD, f"model.head_dropout={p}")
    model = trainer.model
    # LoRA: the score layer is trained in full (peft's modules_to_save), not adapted
    trained = {n for n, q in model.named_parameters() if q.requires_grad}
    assert "base_model.model.score.modules_to_save.default.weight" in trained
    assert not any("score" in n and "lora_" in n for n in trained)
    head = model.get_base_model().score
    seen: dict[str, torch.Tensor] = {}
    head.register_forward_pre_hook(lambda m, a: seen.update(hidden=a[0]), prepend=True)
    head.register_forward_hook(lambda m, a, out: seen.update(head_input=a[0]))
    torch.manual_seed(0)
    ids = torch.randint(3, 50, (4, 16))
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
        hidden, given = seen["hidden"], seen["head_input"]
        if not training:
            assert torch.equal(given, hidden)  # eval: transformers' plain score layer
            continue
        kept = given != 0
        assert 0.4 < 1 - kept.float().mean().item() < 0.6  # about half dropped
        assert torch.allclose(given[kept], hidden[kept] / (1 - p))
