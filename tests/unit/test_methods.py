"""The method registry (launcher/config/methods.py): its names are the schema's, the planner's
trainable-parameter count equals peft's own for every method on tiny real models, and the
method rules refuse what peft / vLLM cannot do."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from launcher.config.methods import METHODS, get_method
from launcher.config.plan import ClusterFacts, Plan, resolve
from launcher.config.recipe import load_recipe
from launcher.config.schema import MethodConfig
from launcher.errors import RecipeError
from launcher.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]
DATA = f"{ROOT}/recipes/data/quickstart_train.jsonl"

CASES = {
    "lora": "{kind: lora, r: 4}",
    "dora": "{kind: lora, r: 4, use_dora: true}",
    "rslora-dora-some": "{kind: lora, r: 8, use_rslora: true, use_dora: true, "
    "target_modules: [q_proj, v_proj, down_proj]}",
    "ia3": "{kind: ia3}",
    "ia3-some": "{kind: ia3, target_modules: [k_proj, v_proj, down_proj]}",
    "ia3-no-ff": "{kind: ia3, target_modules: [q_proj, o_proj]}",
    "prompt": "{kind: prompt, num_virtual_tokens: 7}",
    "prompt-text": "{kind: prompt, num_virtual_tokens: 5, prompt_init_text: the movie was}",
    "prefix": "{kind: prefix, num_virtual_tokens: 6}",
}


def _plan(tmp_path: Path, body: str, *overrides: str) -> Plan:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"name: t\ndata: {{train: {DATA}}}\n{body}")
    recipe = load_recipe(path, list(overrides))
    return resolve(recipe, ClusterFacts(run_dir=str(tmp_path / "run")))


def test_method_names_are_the_schemas() -> None:
    kinds = typing.get_args(MethodConfig.model_fields["kind"].annotation)
    assert set(kinds) == set(METHODS)
    assert get_method("qlora").quantized and not get_method("prompt").mergeable


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("case", list(CASES))
def test_planner_counts_what_peft_trains(arch: str, case: str, tmp_path: Path) -> None:
    """plan.memory's trainable_params == peft's get_nb_trainable_parameters on the model the
    rank builds (the peft config from launcher/train/peft_configs.py)."""
    import peft
    import torch
    import transformers

    from launcher.tiny import write_tiny
    from launcher.train.peft_configs import peft_config

    body = f"model: {{name_or_path: 'tiny:{arch}', dtype: fp32}}\nmethod: {CASES[case]}\n"
    plan = _plan(tmp_path, body, "merge.enabled=false")
    base = write_tiny(arch, RunDir(plan.run_dir).base, seed=0)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    wrapped = peft.get_peft_model(model, peft_config(plan, model))
    trainable, _ = wrapped.get_nb_trainable_parameters()
    assert plan.memory is not None
    assert plan.memory["trainable_params"] == trainable


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("method: {kind: ia3, use_dora: true}", "method.use_dora"),
        ("method: {kind: prompt, use_rslora: true}\nmerge: {enabled: false}", "method.use_rslora"),
        ("method: {kind: lora, num_virtual_tokens: 8}", "method.num_virtual_tokens"),
        ("method: {kind: prefix, prompt_init_text: hi}\nmerge: {enabled: false}",
         "method.prompt_init_text"),
        ("method: {kind: prompt}", "merge.enabled"),
        ("method: {kind: prefix}\nmerge: {enabled: false}\nserve: {enabled: true}",
         "serve.enabled"),
        ("method: {kind: lora, use_dora: true}\nserve: {enabled: true, mode: lora}", "serve.mode"),
        ("method: {kind: ia3}\nserve: {enabled: true, mode: lora}", "serve.mode"),
        ("method: {kind: prompt}\nmerge: {enabled: false}\ndistributed: {strategy: zero3}",
         "distributed.strategy"),
        ("method: {kind: prefix}\nmerge: {enabled: false}\ntrain: {gradient_checkpointing: true}",
         "train.gradient_checkpointing"),
    ],
)  # fmt: skip
def test_method_rules_refuse_naming_the_field(body: str, field: str, tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as err:
        _plan(tmp_path, f"model: {{name_or_path: 'tiny:llama'}}\n{body}")
    assert field in [p.path for p in err.value.problems], err.value.render()
    assert all(p.fix for p in err.value.problems)


@pytest.mark.parametrize(
    "body",
    [
        "method: {kind: qlora, use_dora: true, use_rslora: true}",
        "method: {kind: prompt, prompt_init_text: hi}\nmerge: {enabled: false}\n"
        "eval: {enabled: true}",  # in-process eval needs no server
        "method: {kind: lora, use_rslora: true}\nserve: {enabled: true, mode: lora}",
        "method: {kind: ia3}\nserve: {enabled: true}\neval: {enabled: true}",
        # tried: these train and checkpoint (2 ranks, gloo)
        "method: {kind: prompt}\nmerge: {enabled: false}\ntrain: {gradient_checkpointing: true}",
        "method: {kind: prefix}\nmerge: {enabled: false}\ndistributed: {strategy: zero2}",
    ],
)
def test_what_peft_and_vllm_can_do_is_accepted(body: str, tmp_path: Path) -> None:
    _plan(tmp_path, f"model: {{name_or_path: 'tiny:llama'}}\n{body}")


def test_trainable_counts_of_an_8b_by_hand() -> None:
    """Llama 3.1 8B (32 layers, hidden 4096, 8 kv heads of 128, MLP 14336)."""
    from launcher.config.arch import BUILTIN
    from launcher.config.methods import trainable_params

    shape = BUILTIN["llama3.1-8b"]
    lora = 32 * 16 * 81_920
    out_features = 4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 4096  # per layer
    assert trainable_params(shape, "lora", r=16, use_dora=True) == lora + 32 * out_features
    ia3 = 4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 14336  # down_proj scales its input
    assert trainable_params(shape, "ia3") == 32 * ia3
    assert trainable_params(shape, "prompt", num_virtual_tokens=20) == 20 * 4096
    assert trainable_params(shape, "prefix", num_virtual_tokens=20) == 20 * 32 * 2 * 1024
