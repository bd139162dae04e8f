"""The streaming merge of DoRA, rsLoRA and IA3 adapters equals peft's own merge_and_unload
(fp32, the tolerance of test_merge.py), and prompt/prefix adapters are refused (exit 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from launcher.errors import RecipeError
from launcher.merge.run import merge_run
from launcher.rundir import RunDir

from .conftest import write_adapter, write_plan
from .test_merge import ATOL_FP32, assert_same, load_dir, marker_of, peft_merged


def perturb(final: Path, pattern: str, seed: int = 3) -> None:
    """Move the adapter's `pattern` tensors (DoRA magnitudes, IA3 scales) off their
    initial values, as training would, so the merge has something to fold in."""
    from safetensors.torch import load_file, save_file

    path = final / "adapter_model.safetensors"
    tensors = load_file(str(path))
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in tensors.items():
        if pattern in name:
            noise = 1 + 0.2 * torch.randn(tensor.shape, generator=gen)
            tensors[name] = (tensor * noise).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


def write_ia3(run: Path, base: Path, **ia3: Any) -> Path:
    """A real peft IA3 adapter in RUN_DIR/final (training's tokenizer beside it)."""
    import peft
    import transformers

    from launcher.train.peft_configs import linear_names

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if ia3["target_modules"] == "all-linear":  # as training spells it (peft_configs.py)
        ia3["target_modules"] = linear_names(model)
    pm = peft.get_peft_model(model, peft.IA3Config(task_type="CAUSAL_LM", **ia3))
    final = RunDir(run).final
    pm.save_pretrained(final)
    transformers.AutoTokenizer.from_pretrained(base).save_pretrained(final)
    perturb(final, "ia3_l")
    return final


@pytest.mark.parametrize(
    ("arch", "options"),
    [
        ("llama", {"use_dora": True}),
        ("qwen2", {"use_dora": True, "use_rslora": True}),  # q/k/v biases untouched by DoRA
        ("mistral", {"use_rslora": True}),
    ],
)
def test_dora_rslora_merge_equals_peft(
    arch: str, options: dict[str, Any], bases: Any, tmp_path: Path
) -> None:
    base = bases(arch)
    run = tmp_path / "run"
    write_plan(run, str(base), method=options, merge={"shard_size_gb": 0.0002})
    final = write_adapter(run, base, **options)
    perturb(final, "lora_magnitude_vector")

    out = merge_run(run)

    assert_same(load_dir(out), peft_merged(base, final), ATOL_FP32)
    assert marker_of(out)["verified_max_logit_diff"] < 1e-4


@pytest.mark.parametrize(
    ("arch", "targets"),
    [("llama", "all-linear"), ("qwen2", ["k_proj", "v_proj", "down_proj"])],  # qwen2: biases
)
def test_ia3_merge_equals_peft(arch: str, targets: Any, bases: Any, tmp_path: Path) -> None:
    base = bases(arch)
    run = tmp_path / "run"
    write_plan(
        run, str(base), method={"kind": "ia3", "target_modules": targets},
        merge={"shard_size_gb": 0.0002},
    )  # fmt: skip
    final = write_ia3(run, base, target_modules=targets, feedforward_modules=["down_proj"])

    out = merge_run(run)

    assert_same(load_dir(out), peft_merged(base, final), ATOL_FP32)
    assert marker_of(out)["verified_max_logit_diff"] < 1e-4


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_prompt_and_prefix_are_not_merged(kind: str, bases: Any, tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_plan(run, str(bases("llama")), method={"kind": kind}, merge={"enabled": False})
    with pytest.raises(RecipeError, match="nothing to merge") as err:
        merge_run(run)
    assert err.value.problems[0].path == "method.kind"
    assert not RunDir(run).merged.exists()


def test_qlora_dora_merge_matches_the_4bit_base_plus_adapter(bases: Any, tmp_path: Path) -> None:
    """DoRA on a 4-bit base: with the NF4 round trip the merged model computes what training
    computed (the magnitudes normalise the dequantized weight plus the LoRA delta)."""
    import transformers
    from peft import PeftModel

    from .test_merge import load_4bit

    base = bases("llama")
    run = tmp_path / "run"
    write_plan(
        run, str(base), method={"kind": "qlora", "use_dora": True},
        merge={"nf4_roundtrip": True},
    )  # fmt: skip
    final = write_adapter(run, base, use_dora=True)
    perturb(final, "lora_magnitude_vector")
    merged_dir = merge_run(run)
    trained = PeftModel.from_pretrained(load_4bit(base, torch.float32), str(final)).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    ids = transformers.AutoTokenizer.from_pretrained(final)(
        "the movie was good", return_tensors="pt"
    )
    with torch.no_grad():
        diff = float((trained(**ids).logits - merged(**ids).logits).abs().max())
    assert diff < 1e-3
