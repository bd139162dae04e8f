"""The training methods (method.kind), one `Method` object each, found by name.

Code asks `get_method(recipe.method.kind)` what a method does (an adapter or the whole model,
a 4-bit base, LoRA options, mergeable into the weights, servable by vLLM) instead of comparing
kinds. The schema's method.kind literal equals the registry's names (tests/unit/test_methods.py).
The peft config a rank builds for each is `launcher/train/peft_configs.py`; the trainable
parameters the planner counts for each are `trainable_params` below (the same count peft's
`get_nb_trainable_parameters` gives, checked on tiny models in tests/unit/test_methods.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from launcher.config.arch import ModelShape
from launcher.config.schema import MethodConfig, Recipe


@dataclass(frozen=True)
class Method:
    name: str
    summary: str  # one line for the README's method table
    adapter: bool  # final/ holds a peft adapter (else the full model)
    quantized: bool  # the base is loaded in 4 bits (bitsandbytes)
    lora: bool  # LoRA matrices: method.r / alpha / dropout / use_dora / use_rslora apply
    targets: bool  # method.target_modules applies
    virtual_tokens: bool  # prompt learning: method.num_virtual_tokens applies
    mergeable: bool  # the streaming merge folds it into the weights (launcher/merge/)
    vllm: bool  # vLLM can serve it (merged, or as a LoRA module)

    @property
    def in_process_eval(self) -> bool:
        """eval generates with transformers in-process (serve/local_generate.py), not vLLM."""
        return not self.vllm


_ADAPTER = {"adapter": True, "quantized": False}
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "full", "every weight trained", adapter=False, quantized=False, lora=False,
            targets=False, virtual_tokens=False, mergeable=False, vllm=True,
        ),
        Method(
            "lora", "low-rank adapters B @ A on target_modules; DoRA, rsLoRA",
            **_ADAPTER, lora=True, targets=True, virtual_tokens=False, mergeable=True, vllm=True,
        ),
        Method(
            "qlora", "LoRA on a 4-bit NF4/FP4 base; DoRA, rsLoRA",
            adapter=True, quantized=True, lora=True, targets=True, virtual_tokens=False,
            mergeable=True, vllm=True,
        ),
        Method(
            "ia3", "IA3: a learned scale per feature of target_modules",
            **_ADAPTER, lora=False, targets=True, virtual_tokens=False, mergeable=True, vllm=True,
        ),
        Method(
            "prompt", "prompt tuning: num_virtual_tokens trained input embeddings",
            **_ADAPTER, lora=False, targets=False, virtual_tokens=True, mergeable=False,
            vllm=False,
        ),
        Method(
            "prefix", "prefix tuning: num_virtual_tokens trained keys/values at every layer",
            **_ADAPTER, lora=False, targets=False, virtual_tokens=True, mergeable=False,
            vllm=False,
        ),
    )
}  # fmt: skip


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


def lora_module(method: MethodConfig) -> bool:
    """vLLM can serve this adapter as a LoRA module on its base: plain LoRA (rsLoRA too);
    vLLM refuses DoRA (vllm/lora/peft_helper.py) and IA3 is no LoRA."""
    return get_method(method.kind).lora and not method.use_dora


def trainable_params(
    shape: ModelShape,
    kind: str,
    *,
    r: int = 16,
    targets: list[str] | str = "all-linear",
    use_dora: bool = False,
    num_virtual_tokens: int = 20,
) -> int:
    """Parameters the method trains, besides method.modules_to_save (peft's own count):
    lora/qlora r * (in + out) per adapted linear, plus DoRA's magnitude (out) per linear;
    ia3 one scale per output feature (per input feature for the MLP's down projection);
    prompt num_virtual_tokens * hidden; prefix num_virtual_tokens * layers * 2 (key and value)
    * kv_heads * head_dim (peft sizes the prefix for grouped-query attention)."""
    if kind == "full":
        return shape.total_params()
    method = get_method(kind)
    if method.lora:
        dora = sum(out for _, out in shape.targeted(targets).values()) if use_dora else 0
        return shape.lora_params(r, targets) + shape.num_layers * dora
    if kind == "ia3":
        feedforward = shape.feedforward_module
        per_layer = sum(
            i if name == feedforward else o for name, (i, o) in shape.targeted(targets).items()
        )
        return shape.num_layers * per_layer
    if kind == "prompt":
        return num_virtual_tokens * shape.hidden_size
    if kind == "prefix":
        kv = shape.num_kv_heads * shape.head_dim
        return num_virtual_tokens * shape.num_layers * 2 * kv
    raise ValueError(f"no parameter count for method {kind!r}")


# --------------------------------------------------------------------------------------------
# Training objectives: what the rank's trainer optimises, decided by the plan


@dataclass(frozen=True)
class Objective:
    name: str
    summary: str  # one line for the README's objective table
    trainer: str  # dotted path of the trainer class the rank builds (launcher/train/trainers.py)
    config: str  # dotted path of that trainer's arguments class (launcher/train/args.py)
    formats: tuple[str, ...]  # the data.format values it trains
    reference: bool  # the trainer keeps a frozen reference model (memory, time)


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("sft", "next-token loss (completion only for chat data)",
                  "trl.SFTTrainer", "trl.SFTConfig", ("alpaca", "messages", "text"), reference=False),
        Objective("dpo", "direct preference optimisation on chosen/rejected pairs",
                  "trl.DPOTrainer", "trl.DPOConfig", ("preference",), reference=True),
        Objective("orpo", "SFT loss on chosen + odds-ratio penalty on rejected",
                  "trl.experimental.orpo.ORPOTrainer",
                  "trl.experimental.orpo.ORPOConfig", ("preference",), reference=False),
        Objective("simpo", "length-normalised reward margin (CPO, loss_type=simpo)",
                  "trl.experimental.cpo.CPOTrainer",
                  "trl.experimental.cpo.CPOConfig", ("preference",), reference=False),
        Objective("kto", "Kahneman-Tversky: unpaired desirable / undesirable rows",
                  "trl.KTOTrainer", "trl.KTOConfig", ("kto",), reference=True),
        Objective("reward", "Bradley-Terry reward model: one score, chosen above rejected",
                  "trl.RewardTrainer", "trl.RewardConfig", ("reward",), reference=False),
        Objective("classification", "cross-entropy over model.num_labels classes",
                  "transformers.Trainer", "transformers.TrainingArguments", ("classification",), reference=False),
    )
}  # fmt: skip


def objective_of(recipe: Recipe) -> str:
    """The objective a recipe trains: its data format's, and for preference pairs
    train.preference_loss (DPO, ORPO or SimPO)."""
    fmt = recipe.data.format
    if fmt == "preference":
        return recipe.train.preference_loss
    return next(o.name for o in OBJECTIVES.values() if fmt in o.formats)


def kto_order(pairing: str) -> dict[str, Any]:
    """The order KTO's rows are drawn in: TRL's pairing within a micro-batch needs its fixed
    (sequential) order, KTOConfig's default; with each row carrying its KL partner
    (previous_row, launcher/train/kto_pairs.py) the Trainer shuffles them, as LLaMA-Factory."""
    return {"train_sampling_strategy": "random"} if pairing == "previous_row" else {}


def objective_args(recipe: Recipe) -> dict[str, Any]:
    """The objective's own fields of its TRL config (DPOConfig, KTOConfig, ORPOConfig,
    CPOConfig, RewardConfig), every value decided here once; {} for SFT and classification
    (their arguments are launcher/train/args.py's)."""
    train, name = recipe.train, objective_of(recipe)
    length = {"max_length": recipe.data.max_seq_len}
    if name == "kto":
        return {
            "beta": train.dpo_beta,
            "desirable_weight": train.kto_desirable_weight,
            "undesirable_weight": train.kto_undesirable_weight,
            **length,
            **kto_order(train.kto_kl_pairing),
        }
    if name in ("dpo", "orpo"):
        return {"beta": train.dpo_beta, **length}
    if name == "simpo":
        # CPOConfig's SimPO: no behaviour-cloning term (cpo_alpha=0), as TRL sets for it
        return {
            "beta": train.dpo_beta,
            "loss_type": "simpo",
            "cpo_alpha": 0.0,
            "simpo_gamma": train.simpo_gamma,
            **length,
        }
    if name == "reward":
        return length
    return {}
