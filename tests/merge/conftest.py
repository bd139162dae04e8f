"""Builders for merge tests: tiny multi-shard bases, real peft adapters, real plans."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher.rundir import RunDir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TEMPLATE_MARK = "{# trained #}"  # added to final/'s chat template: merged/ must carry it


def save_multishard(model: Any, out: Path, max_shard_size: str) -> None:
    """save_pretrained in several shards (HF's own sharding, so layers straddle shards)."""
    model.save_pretrained(out, max_shard_size=max_shard_size)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 4, "the base must really be multi-shard"


def scramble_shards(base: Path, shards: int = 5) -> None:
    """Re-shard so tensors of one layer land in distant shards, in no natural order."""
    from safetensors.torch import load_file, save_file

    index_path = base / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    tensors: dict[str, Any] = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(base / file)))
        (base / file).unlink()
    names = sorted(tensors, reverse=True)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i::shards]}
        save_file(part, str(base / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index["weight_map"] = weight_map
    index_path.write_text(json.dumps(index, indent=2))


def build_base(arch: str, out: Path, max_shard_size: str = "100KB") -> Path:
    """A tiny random `arch` model (launcher.tiny) saved multi-shard, with its tokenizer."""
    import torch
    import transformers

    from launcher.tiny import write_tiny

    src = out.with_name(out.name + "-single")
    write_tiny(arch, src, seed=1)
    auto = (
        transformers.AutoModelForSequenceClassification
        if arch == "distilbert"
        else transformers.AutoModelForCausalLM
    )
    model = auto.from_pretrained(src, dtype=torch.float32)
    save_multishard(model, out, max_shard_size)
    transformers.AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def write_plan(run_dir: Path, base: str, **sections: dict[str, Any]) -> Any:
    """plan.json (and the rest of the run dir) through the real recipe loader and resolver."""
    from launcher.config.arch import read_local_config
    from launcher.config.plan import ClusterFacts, resolve
    from launcher.config.recipe import load_recipe
    from launcher.plan_files import write_plan

    data: dict[str, Any] = {
        "name": "merge-test",
        "model": {"name_or_path": base, "dtype": "fp32"},
        "method": {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(run_dir / "train.jsonl")},
        "train": {"precision": "fp32", "micro_batch_size": 1, "global_batch_size": 1},
        "resources": {"accelerator": "cpu", "gpus_per_node": 1},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    recipe = load_recipe(path)
    plan = resolve(recipe, ClusterFacts(run_dir=str(run_dir), model_config=read_local_config(base)))
    write_plan(plan)
    return plan


def write_adapter(
    run_dir: Path,
    base: Path,
    *,
    task: str = "causal_lm",
    seed: int = 0,
    **lora: Any,
) -> Path:
    """A real peft LoRA adapter with non-zero B (as training would leave it) in RUN_DIR/final,
    plus training's tokenizer (its chat template marked), generation config and contract."""
    import peft
    import torch
    import transformers

    auto = (
        transformers.AutoModelForSequenceClassification
        if task == "sequence_classification"
        else transformers.AutoModelForCausalLM
    )
    model = auto.from_pretrained(base, dtype=torch.float32)
    kwargs: dict[str, Any] = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}
    kwargs.update(lora)
    task_type = "SEQ_CLS" if task == "sequence_classification" else "CAUSAL_LM"
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, peft.LoraConfig(task_type=task_type, **kwargs))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in pm.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
            if "lora_bias" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    final = RunDir(run_dir).final
    pm.save_pretrained(final)
    tok = transformers.AutoTokenizer.from_pretrained(base)
    if tok.chat_template:
        tok.chat_template = tok.chat_template + TEMPLATE_MARK
    tok.save_pretrained(final)
    if task == "causal_lm":
        transformers.GenerationConfig.from_pretrained(base).save_pretrained(final)
    contract = {"chat_template": tok.chat_template, "eos_token_id": tok.eos_token_id}
    (final / "train_contract.json").write_text(json.dumps(contract))
    return final


@pytest.fixture(scope="session")
def bases(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """arch -> a multi-shard tiny base, built once per session."""
    root = tmp_path_factory.mktemp("bases")
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = build_base(arch, root / arch)
        return cache[arch]

    return get
