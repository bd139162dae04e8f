"""The method rules (method.kind and its options), run from the one list in rules.py.

Each refusal was seen, not guessed: peft 0.21 raises on the combination, or vLLM's own check
(vllm/lora/peft_helper.py) refuses the adapter, or the method has no weights to merge.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from launcher.config.methods import get_method, objective_of
from launcher.config.strategies import get_strategy
from launcher.errors import Problem

if TYPE_CHECKING:
    from launcher.config.rules import Candidate


def lora_options_need_lora(c: Candidate) -> list[Problem]:
    method = c.recipe.method
    if get_method(method.kind).lora:
        return []
    return [
        Problem(
            f"method.{name}",
            f"{name} is a LoRA option; method.kind={method.kind} has no LoRA matrices",
            "use method.kind=lora or qlora, or remove it",
            True,
        )
        for name in ("use_dora", "use_rslora")
        if getattr(method, name)
    ]


def virtual_token_options_need_prompt_learning(c: Candidate) -> list[Problem]:
    method = c.recipe.method
    problems = []
    given = method.model_fields_set
    if "num_virtual_tokens" in given and not get_method(method.kind).virtual_tokens:
        problems.append(
            Problem(
                "method.num_virtual_tokens",
                f"method.kind={method.kind} trains no virtual tokens",
                "use method.kind=prompt or prefix, or remove it",
                method.num_virtual_tokens,
            )
        )
    if method.prompt_init_text is not None and method.kind != "prompt":
        problems.append(
            Problem(
                "method.prompt_init_text",
                f"only prompt tuning starts from a text (method.kind={method.kind})",
                "use method.kind=prompt, or remove it",
                method.prompt_init_text,
            )
        )
    return problems


def unmergeable_methods_are_not_merged_or_served(c: Candidate) -> list[Problem]:
    """Prompt and prefix tuning add inputs, not weight deltas: nothing to fold into the base,
    and vLLM loads neither. Their eval generates in-process (serve/local_generate.py)."""
    recipe = c.recipe
    method = get_method(recipe.method.kind)
    problems = []
    if not method.mergeable and method.adapter and recipe.merge.enabled:
        problems.append(
            Problem(
                "merge.enabled",
                f"method.kind={method.name} trains virtual tokens, not weights: there is "
                "nothing to merge into the base",
                "set merge.enabled=false (the adapter in RUN_DIR/final is the result)",
                True,
            )
        )
    if not method.vllm and recipe.serve.enabled:
        problems.append(
            Problem(
                "serve.enabled",
                f"vLLM cannot serve a method.kind={method.name} adapter",
                "set serve.enabled=false; eval.enabled evaluates it in-process with transformers",
                True,
            )
        )
    return problems


def lora_module_serving_is_plain_lora(c: Candidate) -> list[Problem]:
    """vLLM serves plain LoRA modules only: it refuses DoRA ("vLLM does not yet support
    DoRA"), and IA3 is no LoRA. Those are served merged."""
    recipe = c.recipe
    if recipe.serve.mode != "lora" or not recipe.serve.enabled:
        return []
    kind = recipe.method.kind
    if kind == "ia3" or (get_method(kind).lora and recipe.method.use_dora):
        what = "IA3" if kind == "ia3" else "DoRA"
        return [
            Problem(
                "serve.mode",
                f"vLLM cannot load a {what} adapter as a LoRA module",
                "use serve.mode=merged (the merge folds it into the weights)",
                "lora",
            )
        ]
    return []


def prompt_learning_not_under_zero3(c: Candidate) -> list[Problem]:
    """Seen on peft 0.21 + DeepSpeed 0.19.8 (2 ranks): the first checkpoint hangs. Saving a
    prompt/prefix adapter runs the prompt encoder forward on rank 0 alone
    (PeftModel.get_prompt_embedding_to_save), and under ZeRO-3 that forward all-gathers the
    encoder's partitioned weight, waiting for ranks that never join."""
    recipe = c.recipe
    method = get_method(recipe.method.kind)
    if not method.virtual_tokens or get_strategy(recipe.distributed.strategy).zero_stage != 3:
        return []
    return [
        Problem(
            "distributed.strategy",
            f"method.kind={method.name} under ZeRO-3 hangs at the first checkpoint (peft "
            "saves the virtual tokens with a forward on rank 0 alone, which waits on the "
            "other ranks to gather the partitioned weights)",
            "use distributed.strategy=zero2 or ddp: the virtual tokens are small, sharding "
            "them saves nothing",
            "zero3",
        )
    ]


def prefix_tuning_without_gradient_checkpointing(c: Candidate) -> list[Problem]:
    """Seen on peft 0.21 + transformers 5.19 (2 ranks, gloo): with gradient checkpointing the
    first training step fails in sdpa attention, the attention mask and the keys (prompt +
    prefix) of different lengths ("The size of tensor a (25) must match the size of tensor b
    (41)"), inside the checkpointed layer's forward."""
    recipe = c.recipe
    if recipe.method.kind != "prefix" or not recipe.train.gradient_checkpointing:
        return []
    return [
        Problem(
            "train.gradient_checkpointing",
            "prefix tuning fails under gradient checkpointing (the checkpointed layers' "
            "attention mask and prefix keys differ in length: peft 0.21, transformers 5)",
            "set train.gradient_checkpointing=false, or use method.kind=prompt",
            True,
        )
    ]


# --------------------------------------------------------------------------------------------
# The objectives (methods.OBJECTIVES): settings one cannot honour


def preference_settings_need_preference_pairs(c: Candidate) -> list[Problem]:
    """train.preference_loss and train.simpo_gamma choose among the pair objectives; any
    other data format trains another objective, which would silently ignore them."""
    recipe, given = c.recipe, c.recipe.train.model_fields_set
    objective = objective_of(recipe)
    problems = []
    if "preference_loss" in given and recipe.data.format != "preference":
        problems.append(
            Problem(
                "train.preference_loss",
                f"data.format={recipe.data.format} trains the {objective} objective, not a "
                "preference loss",
                "use data.format=preference, or remove train.preference_loss",
                recipe.train.preference_loss,
            )
        )
    for name in ("kto_desirable_weight", "kto_undesirable_weight", "kto_kl_pairing"):
        if name in given and objective != "kto":
            problems.append(
                Problem(
                    f"train.{name}",
                    f"a KTO setting; data.format={recipe.data.format} trains {objective}",
                    "use data.format=kto, or remove it",
                    getattr(recipe.train, name),
                )
            )
    if "simpo_gamma" in given and objective != "simpo":
        problems.append(
            Problem(
                "train.simpo_gamma",
                f"the SimPO margin does not apply to the {objective} objective",
                "set train.preference_loss=simpo (data.format=preference), or remove it",
                recipe.train.simpo_gamma,
            )
        )
    return problems


def reward_model_has_one_output(c: Candidate) -> list[Problem]:
    """A reward model scores a text with one number (TRL's RewardTrainer: chosen above
    rejected, Bradley-Terry)."""
    recipe = c.recipe
    labels = recipe.model.num_labels
    if recipe.data.format == "classification" and labels == 1:
        return [
            Problem(
                "model.num_labels",
                "a classifier needs two classes or more (one output is a reward model's score)",
                "set model.num_labels to the number of classes, or use data.format=reward",
                labels,
            )
        ]
    if recipe.data.format != "reward" or labels in (None, 1):
        return []
    return [
        Problem(
            "model.num_labels",
            f"a reward model has one output (its score), not {labels}",
            "set model.num_labels=1",
            labels,
        )
    ]


def kto_needs_two_rows_per_batch(c: Candidate) -> list[Problem]:
    """TRL's KTOTrainer pairs each row with another completion of the same micro-batch for
    its KL term, and refuses a micro-batch of one row; train.kto_kl_pairing=previous_row
    pairs across the data (launcher/train/kto_pairs.py), any micro-batch."""
    recipe = c.recipe
    if objective_of(recipe) != "kto":
        return []
    if recipe.train.kto_kl_pairing == "previous_row":
        if not get_strategy(recipe.distributed.strategy).deepspeed:
            return []
        # the trainer passes TRL's checks with a micro-batch of 2 while it is built, which a
        # DeepSpeed config holding the recipe's micro-batch rejects: never tried, so refused
        return [
            Problem(
                "train.kto_kl_pairing",
                "previous_row is not run under DeepSpeed",
                "use distributed.strategy ddp or fsdp, or kto_kl_pairing: micro_batch with "
                "train.micro_batch_size of 2 or more",
                recipe.train.kto_kl_pairing,
            )
        ]
    if recipe.train.micro_batch_size > 1:
        return []
    return [
        Problem(
            "train.micro_batch_size",
            "KTO estimates its KL term from the other rows of a micro-batch: one row has none",
            "set train.micro_batch_size to 2 or more, or train.kto_kl_pairing=previous_row "
            "(each row paired with the previous row of the data, as LLaMA-Factory)",
            recipe.train.micro_batch_size,
        )
    ]


def head_dropout_needs_a_head(c: Candidate) -> list[Problem]:
    """model.head_dropout drops the input of a classifier's or reward model's score layer; a
    causal LM has no such layer (its lm_head is the vocabulary projection)."""
    model = c.recipe.model
    if model.head_dropout == 0 or model.task == "sequence_classification":
        return []
    return [
        Problem(
            "model.head_dropout",
            f"model.task={model.task} has no score or classifier layer to drop the input of",
            "use model.task=sequence_classification (a classifier or data.format=reward), "
            "or remove it",
            model.head_dropout,
        )
    ]
