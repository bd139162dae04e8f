"""The peft config a rank trains with, one builder per adapter method (method.kind).

What each method is (adapter, mergeable, served by vLLM) is the registry in
launcher/config/methods.py; this is the rank's half: the peft object. Full fine-tuning has
none. The TRL trainers apply it right after `set_seed`, so every rank starts from the same
adapter (launcher/train/model.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from launcher.config.plan import Plan
from launcher.errors import Problem, RecipeError


def _targets(plan: Plan, model: Any) -> tuple[str, list[str] | None, list[str] | None]:
    """peft's task type, modules_to_save and exclude_modules: a classifier's head is trained
    in full (modules_to_save), not adapted."""
    from launcher.train.model import head_modules

    method = plan.recipe.method
    classify = plan.recipe.model.task == "sequence_classification"
    modules_to_save = list(method.modules_to_save)
    exclude = None
    if classify:
        heads = head_modules(model)
        modules_to_save += [h for h in heads if h not in modules_to_save]
        exclude = heads
    return ("SEQ_CLS" if classify else "CAUSAL_LM"), modules_to_save or None, exclude


def lora_config(plan: Plan, model: Any) -> Any:
    """lora and qlora, with DoRA / rsLoRA as the recipe asks."""
    from peft import LoraConfig

    method = plan.recipe.method
    task, modules_to_save, exclude = _targets(plan, model)
    return LoraConfig(
        task_type=task,
        r=method.r,
        lora_alpha=method.alpha,  # type: ignore[arg-type]  # annotated int, used as a number
        lora_dropout=method.dropout,
        target_modules=method.target_modules,
        modules_to_save=modules_to_save,
        exclude_modules=exclude,
        use_dora=method.use_dora,
        use_rslora=method.use_rslora,
    )


def linear_names(model: Any, skip: list[str] | None = None) -> list[str]:
    """The names of the blocks' nn.Linear modules (q_proj, ..., down_proj): what all-linear
    adapts, without the output embedding and the `skip` heads."""
    import torch

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = set(skip or [])
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)
            and module is not output
            and name.split(".", 1)[0] not in heads
        }
    )


def ia3_config(plan: Plan, model: Any) -> Any:
    """IA3 on target_modules; the MLP's down projection (when targeted) scales its input,
    named explicitly so that architectures outside peft's table work too. all-linear is
    spelt out as module names: peft 0.21 saves an all-linear IA3 config with full module
    paths that its own loader then refuses (feedforward_modules not a subset of them)."""
    from peft import IA3Config

    method = plan.recipe.method
    task, modules_to_save, exclude = _targets(plan, model)
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    feedforward = "lin2" if model_type == "distilbert" else "down_proj"
    targets = method.target_modules
    if targets == "all-linear":
        targets = linear_names(model, exclude)
    return IA3Config(
        task_type=task,
        target_modules=targets,
        feedforward_modules=[feedforward] if feedforward in targets else [],
        modules_to_save=modules_to_save,
        exclude_modules=exclude,
    )


def prompt_config(plan: Plan, model: Any) -> Any:
    """Prompt tuning: virtual-token embeddings, random or from prompt_init_text."""
    from peft import PromptTuningConfig

    method = plan.recipe.method
    task, _, _ = _targets(plan, model)
    text = method.prompt_init_text
    kwargs: dict[str, Any] = {}
    if text:
        kwargs = {
            "prompt_tuning_init": "TEXT",
            "prompt_tuning_init_text": text,
            "tokenizer_name_or_path": plan.base_model,
        }
    return PromptTuningConfig(
        task_type=task, num_virtual_tokens=method.num_virtual_tokens, **kwargs
    )


def prefix_config(plan: Plan, model: Any) -> Any:
    """Prefix tuning: trained keys and values prepended at every layer."""
    from peft import PrefixTuningConfig

    task, _, _ = _targets(plan, model)
    return PrefixTuningConfig(
        task_type=task, num_virtual_tokens=plan.recipe.method.num_virtual_tokens
    )


BUILDERS: dict[str, Callable[[Plan, Any], Any]] = {
    "lora": lora_config,
    "qlora": lora_config,
    "ia3": ia3_config,
    "prompt": prompt_config,
    "prefix": prefix_config,
}


def missing_targets(model: Any, targets: list[str]) -> list[str]:
    """The names in method.target_modules that no module of the model has (peft matches a
    name to a module path equal to it or ending in `.name`)."""
    paths = [name for name, _ in model.named_modules()]
    return [t for t in targets if not any(p == t or p.endswith(f".{t}") for p in paths)]


def peft_config(plan: Plan, model: Any) -> Any:
    """The method's peft config, None for full fine-tuning. RecipeError when a named target
    module does not exist: peft adapts the others without a word (oumi's Phi-3 KTO config
    names q_proj, k_proj, v_proj, gate_proj and up_proj, which Phi-3 fuses into qkv_proj and
    gate_up_proj: only o_proj and down_proj would be trained)."""
    if not plan.method.adapter:
        return None
    targets = plan.recipe.method.target_modules
    if isinstance(targets, list) and plan.recipe.method.kind in ("lora", "qlora", "ia3"):
        missing = missing_targets(model, targets)
        if missing:
            model_type = getattr(getattr(model, "config", None), "model_type", "the model")
            raise RecipeError(
                [
                    Problem(
                        "method.target_modules",
                        f"{', '.join(missing)}: no module of {model_type} has that name; peft "
                        "would adapt only the others",
                        "name the model's layers ("
                        + ", ".join(linear_names(model))
                        + ") or use all-linear",
                        targets,
                    )
                ],
                "method",
            )
    return BUILDERS[plan.recipe.method.kind](plan, model)
