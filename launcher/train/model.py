"""Build the model a rank trains: dtype, 4-bit quantization (QLoRA), the PEFT config.

The TRL trainers apply `peft_config` themselves, right after `set_seed(args.seed)`, so every
rank starts from the same adapter; the classification path (plain Trainer,
launcher/train/trainers.py) calls `wrap_peft`, which does the same. Call `build_model` after
the TrainingArguments exist: under ZeRO-3 they tell `from_pretrained` to partition the
weights while loading.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from launcher.config.plan import Plan
from launcher.errors import Problem, RecipeError, RunError
from launcher.train.data import RankData

log = logging.getLogger(__name__)

TORCH_DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "uint8": torch.uint8,
}


def quantization_config(plan: Plan) -> Any:
    """BitsAndBytesConfig for method.kind=qlora: LLM.int8 for method.quant.bits=8, else 4-bit
    with the plan's dtypes; None for other methods."""
    if plan.recipe.method.kind != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    quant = plan.recipe.method.quant
    skip: dict[str, Any] = {}
    if plan.recipe.model.task == "sequence_classification":
        # the head is trained in full (modules_to_save): quantized, its weights could not
        # take gradients ("only Tensors of floating point dtype can require gradients")
        heads = ["pre_classifier", "classifier", "score", *plan.recipe.method.modules_to_save]
        skip["llm_int8_skip_modules"] = heads
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    compute, storage = plan.quant_compute_dtype, plan.quant_storage
    assert compute is not None and storage is not None  # a 4-bit qlora plan has both
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=TORCH_DTYPES[compute],
        bnb_4bit_quant_storage=TORCH_DTYPES[storage],
        **skip,
    )


def head_modules(model: Any) -> list[str]:
    """Top-level modules with weights outside the backbone (a classifier head)."""
    prefix = getattr(model, "base_model_prefix", "")
    return [
        name
        for name, child in model.named_children()
        if name != prefix and any(True for _ in child.parameters())
    ]


def build_model(plan: Plan, tokenizer: Any, added_tokens: bool, data: RankData) -> tuple[Any, Any]:
    """The base model ready for the trainer, and its PEFT config (None for full fine-tuning):
    embeddings resized when the tokenizer gained a pad token, the pad id set. Seeded first,
    so that a classifier head starts the same on every rank."""
    import transformers

    transformers.set_seed(plan.recipe.train.seed)
    net = load_model(plan, num_labels=data.num_labels, labels=data.labels)
    if added_tokens:
        net.resize_token_embeddings(len(tokenizer))
    net.config.pad_token_id = tokenizer.pad_token_id
    generation = getattr(net, "generation_config", None)
    if generation is not None:
        generation.pad_token_id = tokenizer.pad_token_id
        # generation stops at the tokenizer's EOS (data.eos_token, a named chat template's
        # end of turn) as well as at the model's own
        eos = generation.eos_token_id
        known = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in known:
            generation.eos_token_id = [tokenizer.eos_token_id, *known]
    return net, peft_config(plan, net)


def load_model(
    plan: Plan, *, num_labels: int | None = None, labels: dict[str, int] | None = None
) -> Any:
    """The plan's base model in the recipe's dtype, 4-bit for QLoRA (prepared for k-bit
    training); a classifier with the data's num_labels and string labels."""
    import transformers

    recipe, base_path = plan.recipe, plan.base_model
    kwargs: dict[str, Any] = {
        "dtype": TORCH_DTYPES[recipe.model.dtype],
        "trust_remote_code": recipe.model.trust_remote_code,
        "attn_implementation": recipe.model.attn_implementation,
    }
    bnb = quantization_config(plan)
    if bnb is not None:
        kwargs["quantization_config"] = bnb
    if recipe.model.task == "sequence_classification":
        if labels:
            kwargs["id2label"] = {i: name for name, i in labels.items()}
            kwargs["label2id"] = dict(labels)
        kwargs["num_labels"] = num_labels
        model = transformers.AutoModelForSequenceClassification.from_pretrained(base_path, **kwargs)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
    if bnb is not None:
        from peft import prepare_model_for_kbit_training

        keep_training_layout(model)
        kinds = sorted({type(m).__name__ for m in model.modules() if "bit" in type(m).__name__})
        quantized = sum(1 for m in model.modules() if type(m).__name__ in kinds)
        log.info("base quantized by bitsandbytes: %d layers (%s)", quantized, ", ".join(kinds))
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=recipe.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    model.config.use_cache = False
    return model


def keep_training_layout(model: Any) -> int:
    """Keep every 4-bit weight in the layout training computes with; returns how many
    `Linear4bit` layers there are.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a `Linear4bit` weight for its CPU
    inference kernel the first time the layer runs in eval mode without grad, which every
    evaluation during training does (its `support_avx512bf16_for_cpu`, read from the CPU at
    construction). After that the layer computes with another kernel than training did, and
    saving it undoes the repack assuming uint8 storage: with `bnb_4bit_quant_storage` bf16
    (what ZeRO-3 needs) the first checkpoint after an eval fails. A training run is not
    inference: the repack is turned off, so eval, training and the saved checkpoint all see
    the same 4-bit weight on every CPU (AVX2 machines never repack)."""
    from bitsandbytes.nn import Linear4bit

    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def peft_config(plan: Plan, model: Any) -> Any:
    """The method's peft config (launcher/train/peft_configs.py), None for full fine-tuning."""
    from launcher.train import peft_configs

    return peft_configs.peft_config(plan, model)


# transformers' names for a sequence classifier's output layer (decoders: score)
HEAD_NAMES = ("score", "classifier")


def add_head_dropout(model: Any, p: float) -> str | None:
    """model.head_dropout: dropout on the input of the score / classifier layer while the
    model trains, as TRL's ValueHead (LLaMA-Factory's reward model) drops its input before its
    linear map. A forward pre-hook on the layer (on peft's wrapper of it, when the head is in
    modules_to_save): no weight is added or renamed, so the saved and merged model keep
    transformers' layout, and evaluation (eval mode) sees no dropout. Returns the layer's
    name; None when p is 0."""
    if not p:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in HEAD_NAMES:
        head = getattr(base, name, None)
        if isinstance(head, torch.nn.Module):
            head.register_forward_pre_hook(functools.partial(_drop_input, p))
            log.info("model.head_dropout: dropout %g on the input of %s while training", p, name)
            return name
    problem = Problem(
        "model.head_dropout",
        f"{type(base).__name__} has no {' or '.join(HEAD_NAMES)} layer",
        "remove it (it applies to transformers' sequence-classification heads)",
        p,
    )
    raise RecipeError([problem], "model")


def _drop_input(p: float, module: torch.nn.Module, args: tuple[Any, ...]) -> Any:
    if not module.training:
        return None
    if not args:  # never silently without the dropout the recipe asks for
        raise RuntimeError(f"{type(module).__name__} was called without a positional input")
    return (torch.nn.functional.dropout(args[0], p, training=True), *args[1:])


MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def uses_every_adapter(plan: Plan, model: Any) -> bool:
    """True when every forward touches every trainable weight: adapters on a dense model.
    Then DDP need not walk the autograd graph for unused parameters after each backward
    (the Trainer turns that search on for any PEFT model). Mixture-of-experts models route
    each token to a few experts, so an adapter on an expert can go unused in a micro-batch."""
    config = getattr(model, "config", None)
    moe = any(getattr(config, key, None) for key in MOE_KEYS)
    return plan.method.adapter and not moe


def wrap_peft(model: Any, config: Any, seed: int) -> Any:
    """get_peft_model after set_seed, as the TRL trainers do: the same adapter on every rank."""
    if config is None:
        return model
    from peft import get_peft_model
    from transformers import set_seed

    set_seed(seed)
    return get_peft_model(model, config)


def cast_adapters(model: Any, plan: Plan) -> int:
    """Every trainable weight of the adapter in the plan's adapter dtype
    (launcher/config/adapter_dtype.py), whatever peft and TRL chose while wrapping. Under
    `auto` DoRA's magnitude vector stays fp32, as TRL leaves it; a dtype the recipe names
    applies to every trainable weight (torchtune's bf16 DoRA). Returns the number of tensors
    cast. Partitioned ZeRO-3 parameters are never cast: there the plan allows only the base
    model's dtype, which they have."""
    dtype = plan.adapter_dtype
    if dtype is None:
        return 0
    target = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    keep_magnitude = plan.recipe.method.adapter_dtype == "auto"
    cast = 0
    for name, param in model.named_parameters():
        if not param.requires_grad or param.dtype == target:
            continue
        if keep_magnitude and "lora_magnitude_vector" in name:
            continue
        if hasattr(param, "ds_id"):
            raise RunError(f"adapter weight {name} is {param.dtype} under ZeRO-3, plan: {dtype}")
        param.data = param.data.to(target)
        cast += 1
    return cast


def count_trainable(model: Any) -> tuple[int, int]:
    trainable = total = 0
    for param in model.parameters():
        n = param.ds_numel if hasattr(param, "ds_numel") else param.numel()
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
