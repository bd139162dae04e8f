"""The trainer of the plan's objective (launcher/config/methods.py OBJECTIVES): TRL's
SFTTrainer, DPOTrainer, KTOTrainer, ORPOTrainer, CPOTrainer (SimPO) or RewardTrainer, or
transformers' Trainer for a classifier, each subclassed by launcher/train/callbacks.py
(atomic checkpoints, the NaN policy, the token count).
"""

from __future__ import annotations

import logging
from typing import Any

from launcher.config.plan import Plan
from launcher.train import callbacks
from launcher.train import model as modeling
from launcher.train.data import RankData, tokenized

log = logging.getLogger(__name__)


def build_trainer(
    plan: Plan,
    net: Any,
    lora: Any,
    args: Any,
    data: RankData,
    tokenizer: Any,
    hooks: callbacks.RunHooks,
    extra_callbacks: list[Any],
) -> Any:
    """The objective's trainer over the model, with the PEFT config applied right after
    set_seed(seed): the same adapter on every rank."""
    kind = plan.objective
    parts: dict[str, Any] = {
        "model": net,
        "args": args,
        "train_dataset": data.train,
        "eval_dataset": data.validation,
        "processing_class": tokenizer,
        "callbacks": extra_callbacks,
    }
    if kind == "classification":
        import transformers

        base: type = transformers.Trainer
        parts |= classifier_parts(plan, net, lora, data, tokenizer)
    else:
        base = trl_trainer(kind)
        if kind == "kto" and plan.recipe.train.kto_kl_pairing == "previous_row":
            from launcher.train.kto_pairs import previous_row_kto_trainer

            base = previous_row_kto_trainer()  # KL partners across the data, any micro-batch
        parts["peft_config"] = lora  # TRL applies it right after set_seed(args.seed)
    trainer_cls = callbacks.trainer_class(base, hooks)
    if plan.recipe.train.weight_decay_exempt == "none":
        trainer_cls = decay_every_parameter(trainer_cls)
    trainer = trainer_cls(**parts)
    modeling.add_head_dropout(trainer.model, plan.recipe.model.head_dropout)
    cast = modeling.cast_adapters(trainer.model, plan)
    if cast:
        log.info("adapter weights cast to %s (method.adapter_dtype): %d", plan.adapter_dtype, cast)
    if kind == "classification":
        # PeftModel.forward takes **kwargs, so the Trainer would believe the classifier
        # normalises its loss by num_items_in_batch; it does not (loss x accumulation x world)
        trainer.model_accepts_loss_kwargs = False
    return trainer


def decay_every_parameter(base: type) -> type:
    """train.weight_decay_exempt=none: the optimizer's decay group holds every trained
    parameter, as torch.optim.AdamW(model.parameters()) decays them in torchtune; the
    Trainer's own rule (Trainer.get_decay_parameter_names) leaves out biases and norm
    weights."""

    class DecayEverything(base):
        def get_decay_parameter_names(self, model: Any) -> list[str]:
            return [name for name, _ in model.named_parameters()]

    DecayEverything.__name__ = DecayEverything.__qualname__ = base.__name__
    return DecayEverything


def trl_trainer(objective: str) -> type:
    """The TRL trainer class of an objective; ORPO and CPO (SimPO) are in trl.experimental."""
    if objective == "orpo":
        from trl.experimental.orpo import ORPOTrainer

        return ORPOTrainer
    if objective == "simpo":
        from trl.experimental.cpo import CPOTrainer

        return CPOTrainer
    import trl

    from launcher.train.reward import truncating_reward_trainer

    trainers = {
        "sft": trl.SFTTrainer,
        "dpo": trl.DPOTrainer,
        "kto": trl.KTOTrainer,
        "reward": truncating_reward_trainer(),  # cuts over-long pairs, TRL's would drop them
    }
    return trainers[objective]


def classifier_parts(
    plan: Plan, net: Any, lora: Any, data: RankData, tokenizer: Any
) -> dict[str, Any]:
    """What transformers' Trainer needs beyond TRL's: the PEFT model, tokenized text padded
    per batch, and accuracy / F1 as the validation metrics."""
    import transformers

    recipe = plan.recipe
    net = modeling.wrap_peft(net, lora, recipe.train.seed)
    if recipe.train.gradient_checkpointing and lora is not None:
        net.enable_input_require_grads()
    max_len = recipe.data.max_seq_len
    return {
        "model": net,
        "train_dataset": tokenized(data.train, tokenizer, max_len),
        "eval_dataset": tokenized(data.validation, tokenizer, max_len),
        "data_collator": transformers.DataCollatorWithPadding(tokenizer),
        "compute_metrics": classification_metrics,
    }


def classification_metrics(prediction: Any) -> dict[str, float]:
    """Accuracy and macro F1 on the validation set."""
    import numpy as np

    logits, labels = prediction.predictions, prediction.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    predicted = np.asarray(logits).argmax(-1)
    labels = np.asarray(labels)
    f1s = []
    for label in np.unique(np.concatenate([labels, predicted])):
        tp = float(((predicted == label) & (labels == label)).sum())
        fp = float(((predicted == label) & (labels != label)).sum())
        fn = float(((predicted != label) & (labels == label)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": float((predicted == labels).mean()), "f1": float(np.mean(f1s))}
