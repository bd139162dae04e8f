"""merge_run on tiny real models: streamed merge == peft merge_and_unload, QLoRA NF4 round trip,
idempotence, verification, and the errors a user can act on."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from launcher.errors import RunError
from launcher.merge.lora import nf4_roundtrip_fn, quantized_weights
from launcher.merge.run import merge_run
from launcher.merge.verify import verify_run
from launcher.rundir import RunDir
from launcher.train.model import keep_training_layout

from .conftest import TEMPLATE_MARK, build_base, scramble_shards, write_adapter, write_plan

ATOL_FP32 = 1e-5  # streamed fp32 merge vs peft merge_and_unload (measured ~1e-7)


def marker_of(path: Path) -> dict[str, Any]:
    marker = RunDir.read_marker(path)
    assert marker is not None, f"{path} is not complete"
    return marker


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = json.loads((path / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for file in sorted(set(index["weight_map"].values())):
        part = load_file(str(path / file))
        assert {k for k, v in index["weight_map"].items() if v == file} == set(part)
        out.update(part)
    return out


def peft_merged(base: Path, final: Path, task: str = "causal_lm") -> dict[str, torch.Tensor]:
    import transformers
    from peft import PeftModel

    auto = (
        transformers.AutoModelForSequenceClassification
        if task == "sequence_classification"
        else transformers.AutoModelForCausalLM
    )
    model = auto.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(final)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def assert_same(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], atol: float) -> None:
    assert set(ours) == set(ref)
    for name, tensor in ref.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=atol, msg=name)


def load_4bit(base: Path, dtype: torch.dtype) -> Any:
    """The base as QLoRA training loads it: NF4 with double quantization, `dtype` compute."""
    import transformers

    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        base, dtype=dtype, quantization_config=config
    )
    keep_training_layout(model)  # as launcher/train/model.py: no CPU inference repack
    return model


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_streamed_merge_equals_peft_merge_and_unload(arch: str, bases: Any, tmp_path: Path) -> None:
    base = bases(arch)
    run = tmp_path / "run"
    write_plan(run, str(base), merge={"shard_size_gb": 0.0002})  # 200 KB shards
    final = write_adapter(run, base)

    out = merge_run(run)

    assert out == RunDir(run).merged
    assert_same(load_dir(out), peft_merged(base, final), ATOL_FP32)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3
    for shard in shards:  # bounded, except a lone tensor larger than the limit
        from safetensors import safe_open

        with safe_open(str(shard), "pt") as fh:
            keys = list(fh.keys())
        assert shard.stat().st_size <= 200_000 + 4096 or len(keys) == 1
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32"
    # tokenizer, template and contract come from training (final/), not the base
    assert TEMPLATE_MARK in (out / "chat_template.jinja").read_text()
    assert (out / "train_contract.json").read_bytes() == (
        final / "train_contract.json"
    ).read_bytes()
    marker = marker_of(out)
    assert marker["verified_max_logit_diff"] < 1e-4
    assert not RunDir(run).merged_staging.exists()
    assert "verified: max |logits difference|" in RunDir(run).merge_log.read_text()


def test_rslora_patterns_modules_to_save_embeddings_scrambled_base(tmp_path: Path) -> None:
    """rslora, per-module rank/alpha, a LoRA on the embedding, lm_head in modules_to_save,
    and a base whose layers are scattered over shards in reverse order."""
    base = build_base("llama", tmp_path / "base")
    scramble_shards(base)
    run = tmp_path / "run"
    write_plan(run, str(base))
    final = write_adapter(
        run,
        base,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        use_rslora=True,
        rank_pattern={"down_proj": 4},
        alpha_pattern={"v_proj": 5},
        modules_to_save=["lm_head"],
    )
    out = merge_run(run)
    merged = load_dir(out)
    assert_same(merged, peft_merged(base, final), ATOL_FP32)
    from safetensors.torch import load_file

    saved = load_file(str(final / "adapter_model.safetensors"))
    assert torch.equal(merged["lm_head.weight"], saved["base_model.model.lm_head.weight"])


def test_distilbert_classifier_head(bases: Any, tmp_path: Path) -> None:
    base = bases("distilbert")
    run = tmp_path / "run"
    write_plan(
        run,
        str(base),
        model={"task": "sequence_classification", "num_labels": 2},
        data={"format": "classification"},
    )
    final = write_adapter(
        run,
        base,
        task="sequence_classification",
        target_modules=["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
        modules_to_save=["pre_classifier"],
    )
    saved = json.loads((final / "adapter_config.json").read_text())
    assert "classifier" in saved["modules_to_save"]
    out = merge_run(run)
    assert_same(load_dir(out), peft_merged(base, final, "sequence_classification"), ATOL_FP32)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("roundtrip", [True, False])
def test_qlora_merge_with_and_without_nf4_roundtrip(
    roundtrip: bool, dtype: str, bases: Any, tmp_path: Path
) -> None:
    import bitsandbytes.functional as bnbf
    import transformers
    from peft import PeftModel

    base = bases("llama")
    run = tmp_path / "run"
    write_plan(
        run,
        str(base),
        model={"dtype": dtype},
        method={"kind": "qlora"},
        train={"precision": dtype},
        merge={"nf4_roundtrip": roundtrip, "verify_tolerance": 1e-3 if dtype == "fp32" else 5e-2},
    )
    final = write_adapter(run, base)
    merged = load_dir(merge_run(run))

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    original = load_dir(base)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = PeftModel.from_pretrained(model, str(final))
    quantized = {n for n in original if "layers." in n and n.endswith("proj.weight")}
    assert quantized == quantized_weights(base, "causal_lm")
    for name, w in original.items():
        expected = w.to(torch_dtype)
        if roundtrip and name in quantized:
            packed, state = bnbf.quantize_4bit(
                expected, blocksize=64, quant_type="nf4", compress_statistics=True
            )
            expected = bnbf.dequantize_4bit(packed, state)
            assert expected.dtype == torch_dtype
        if name in quantized:  # every block linear is adapted (all-linear)
            layer = lora.get_submodule("base_model.model." + name.removesuffix(".weight"))
            delta = layer.get_delta_weight("default")
            expected = (expected.float() + delta).to(torch_dtype)
        assert merged[name].dtype == torch_dtype
        ulp = 0.0 if dtype == "fp32" else 2.0**-7  # bf16: addmm vs add may round differently
        torch.testing.assert_close(
            merged[name].float(), expected.float(), rtol=ulp, atol=1e-6, msg=name
        )


def test_nf4_roundtrip_equals_bitsandbytes_4bit_load(bases: Any) -> None:
    """The round trip reproduces the weights a QLoRA training run really sees: transformers'
    4-bit load (same modules, same values)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    base = bases("llama")
    original = load_dir(base)
    qmodel = load_4bit(base, torch.bfloat16)
    roundtrip = nf4_roundtrip_fn(torch.bfloat16, "nf4", True)
    seen = set()
    for name, module in qmodel.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            seen.add(f"{name}.weight")
            real = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
            assert torch.equal(roundtrip(original[f"{name}.weight"]), real), name
    assert seen == quantized_weights(base, "causal_lm")


@pytest.mark.parametrize("roundtrip", [True, False])
def test_qlora_merged_logits_match_4bit_base_plus_adapter(
    roundtrip: bool, bases: Any, tmp_path: Path
) -> None:
    """With the round trip, the merged model computes what training computed (the 4-bit base +
    the adapter, as transformers/bitsandbytes load it); without it, it is off by the
    quantization error."""
    import transformers
    from peft import PeftModel

    base = bases("llama")
    run = tmp_path / "run"
    write_plan(run, str(base), method={"kind": "qlora"}, merge={"nf4_roundtrip": roundtrip})
    final = write_adapter(run, base)
    merged_dir = merge_run(run)
    base4 = load_4bit(base, torch.float32)
    trained = PeftModel.from_pretrained(base4, str(final)).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    ids = transformers.AutoTokenizer.from_pretrained(final)(
        "the movie was good", return_tensors="pt"
    )
    with torch.no_grad():
        diff = float((trained(**ids).logits - merged(**ids).logits).abs().max())
    if roundtrip:
        assert diff < 1e-5
    else:
        assert diff > 1e-3


def test_idempotent_then_force_then_changed_adapter(
    bases: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = bases("llama")
    run = tmp_path / "run"
    write_plan(run, str(base), merge={"shard_size_gb": 0.0002})
    write_adapter(run, base)
    out = merge_run(run)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    with caplog.at_level(logging.INFO, logger="launcher"):
        assert merge_run(run) == out
    assert "nothing to do" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    merge_run(run, force=True)
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert set(after) == set(before)
    assert all(after[n] > before[n] for n in before if n.endswith(".safetensors"))

    first = marker_of(out)["fingerprint"]
    write_adapter(run, base, seed=7)  # new training result: same file names, new content
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="launcher"):
        merge_run(run)
    assert "nothing to do" not in caplog.text
    assert marker_of(out)["fingerprint"] != first


def test_tampered_merge_fails_verification(bases: Any, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    base = bases("llama")
    run = tmp_path / "run"
    write_plan(run, str(base), merge={"verify_tolerance": 1e-3})
    write_adapter(run, base)
    out = merge_run(run)
    assert verify_run(run) < 1e-4

    index = json.loads((out / "model.safetensors.index.json").read_text())
    name = "model.layers.1.self_attn.o_proj.weight"
    shard = out / index["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(RunError, match=r"merge\.verify_tolerance=0\.001"):
        verify_run(run)


def test_wrong_merge_is_not_published(
    bases: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from launcher.merge.lora import LoraWeight

    base = bases("llama")
    run = tmp_path / "run"
    write_plan(run, str(base))
    write_adapter(run, base)
    real = LoraWeight.add_to

    def doubled(self: LoraWeight, weight: torch.Tensor) -> torch.Tensor:
        once = real(self, weight)
        return real(self, once) if "layers.0.mlp" in self.module else once

    monkeypatch.setattr(LoraWeight, "add_to", doubled)
    with pytest.raises(RunError, match="verify_tolerance"):
        merge_run(run)
    assert not RunDir(run).merged.exists()
    assert (RunDir(run).merged_staging / "model.safetensors.index.json").is_file()
    monkeypatch.undo()  # the next, correct merge replaces the leftover merged.tmp
    assert merge_run(run) == RunDir(run).merged
    assert not RunDir(run).merged_staging.exists()


def test_large_models_skip_verification(
    bases: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    base = bases("llama")
    run = tmp_path / "run"
    write_plan(run, str(base))
    write_adapter(run, base)
    monkeypatch.setattr("launcher.merge.verify.VERIFY_MAX_BYTES", 1000)
    with caplog.at_level(logging.INFO, logger="launcher"):
        out = merge_run(run)
    assert "skipping verification" in caplog.text
    assert marker_of(out)["verified_max_logit_diff"] is None


def test_full_method_serves_final_as_is(bases: Any, tmp_path: Path) -> None:
    base = bases("llama")
    run = tmp_path / "run"
    write_plan(run, str(base), method={"kind": "full"})
    with pytest.raises(RunError, match="no safetensors weights"):
        merge_run(run)
    shutil.copytree(base, RunDir(run).final)
    assert merge_run(run) == RunDir(run).final
    assert not RunDir(run).merged.exists()


def test_user_errors(bases: Any, tmp_path: Path) -> None:
    base = bases("llama")
    run = tmp_path / "run"
    write_plan(run, str(base))
    with pytest.raises(RunError, match="no LoRA adapter"):
        merge_run(run)
    # DoRA merges (test_merge_methods.py), but not on an embedding: peft's norm differs there
    write_adapter(run, base, use_dora=True, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(RunError, match=r"DoRA on .*embed_tokens"):
        merge_run(run)
    with pytest.raises(RunError, match="not a run directory"):
        merge_run(tmp_path)
    from launcher.cli import main

    with RunDir(run).lock("a test"):  # `tune-launch merge` refuses while another holds it
        assert main(["merge", str(run)]) == 1


def test_base_from_offline_hub_cache(
    bases: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub id resolves through the local HF cache (no network); a missing one says what to do."""
    base = bases("llama")
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-llama"
    commit = "0" * 40
    shutil.copytree(base, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))

    run = tmp_path / "run"
    write_plan(run, "acme/tiny-llama")
    final = write_adapter(run, base)
    assert_same(load_dir(merge_run(run)), peft_merged(base, final), ATOL_FP32)

    other = tmp_path / "other"
    write_plan(other, "acme/not-downloaded")
    write_adapter(other, base)
    with pytest.raises(RunError, match="not in the local Hugging Face cache"):
        merge_run(other)


def test_cli_merge(bases: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from launcher.cli import main

    base = bases("llama")
    run = tmp_path / "run"
    write_plan(run, str(base))
    write_adapter(run, base)
    assert main(["merge", str(run)]) == 0
    assert f"merged model: {run / 'merged'}" in capsys.readouterr().out
    assert main(["merge", str(tmp_path / "nowhere")]) == 1
