"""LoRA maths for the streaming merge: the adapter read, bound to the base's keys, merged.

W' = W + scale * B @ A for every adapted weight (scale = alpha / r, alpha / sqrt(r) with
rslora, per-module alpha from alpha_pattern; transposed for fan_in_fan_out and embeddings),
with DoRA then W' = m / ||W'||_row * W' (peft's DoraLinearVariant.merge_safe),
b' = b + scale * lora_B.bias with lora_bias, and the tensors of modules_to_save replaced by
the trained ones. IA3 adapters (launcher/merge/ia3.py) bind the same way: W' = W * l. For QLoRA the weights bitsandbytes quantizes at load can first go through
quantize_4bit/dequantize_4bit (`nf4_roundtrip_fn`, `quantized_weights`).

Memory: the adapter is loaded whole (it is small). The base is read one tensor at a time
(safetensors_stream.py) and the output shards are planned from the base's headers before any
data is read, so each tensor is written as soon as it is merged: peak RSS is about the
adapter plus a few copies of the largest adapted tensor. Tensors the merge leaves as they are
are copied file to file without passing through a torch tensor.

Run orchestration (fingerprint, verification, publishing RUN_DIR/merged) is run.py, beside
this file.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from launcher.errors import RunError
from launcher.merge.safetensors_stream import (
    ST_FLOAT,
    TORCH_TO_ST,
    Checkpoint,
    ShardWriter,
    StoredTensor,
    TensorSpec,
)

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
MODEL_PREFIX = {
    "llama": "model",
    "mistral": "model",
    "qwen2": "model",
    "qwen3": "model",
    "distilbert": "distilbert",
}
_LORA_KEY = re.compile(r"^(?P<mod>.+)\.(?P<part>lora_A|lora_B)\.(?P<param>weight|bias)$")
_EMB_KEY = re.compile(r"^(?P<mod>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)$")
_DORA_KEY = re.compile(r"^(?P<mod>.+)\.lora_magnitude_vector(\.weight)?$")


# --------------------------------------------------------------------------------------------
# The adapter


@dataclass
class LoraWeight:
    """One adapted module: W' = W + scale * B @ A (transposed for embeddings/fan_in_fan_out)."""

    module: str
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    bias: torch.Tensor | None = None  # lora_B.bias (lora_bias=True): b' = b + scale * bias
    scale: float = 1.0
    transpose: bool = False
    magnitude: torch.Tensor | None = None  # DoRA: one trained norm per output feature

    def add_to(self, weight: torch.Tensor) -> torch.Tensor:
        """weight (fp32, modified in place) + scale * B @ A, rescaled to DoRA's magnitude."""
        assert self.a is not None and self.b is not None
        target = weight.t() if self.transpose else weight
        target.addmm_(self.b.float(), self.a.float(), alpha=self.scale)
        if self.magnitude is not None:  # peft: magnitude / ||W + delta|| along each row
            norm = torch.linalg.norm(weight, dim=1)
            weight.mul_((self.magnitude.float() / norm).view(-1, 1))
        return weight

    def changes_bias(self, base_has_bias: bool) -> bool:
        """lora_bias=True trains lora_B.bias (the base must have a bias to add it to)."""
        return self.bias is not None

    def bias_of(self, bias: torch.Tensor) -> torch.Tensor:
        """The merged bias (fp32): b + scale * lora_B.bias."""
        assert self.bias is not None
        return bias.float() + self.scale * self.bias.float()


@dataclass
class Adapter:
    """A peft adapter: module name -> its weight change (LoraWeight, or ia3.Ia3Weight),
    parameter name -> replacement tensor."""

    lora: dict[str, Any]
    replace: dict[str, torch.Tensor]  # modules_to_save / trained biases, by parameter name


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """The alpha_pattern/rank_pattern key matching a module, by peft's rule
    (peft.utils.other.get_pattern_key: the pattern matches a dotted suffix of the name)."""
    return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), None)


def load_adapter(final: Path) -> Adapter:
    """Read final/adapter_config.json + adapter_model.safetensors (peft save_pretrained)."""
    cfg_path, weights = final / "adapter_config.json", final / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        hint = ""
        if (final / "adapter_model.bin").is_file():
            hint = " (adapter_model.bin found: save with safe_serialization=True)"
        raise RunError(
            f"no LoRA adapter in {final}: expected adapter_config.json and "
            f"adapter_model.safetensors{hint}. Has training finished? (`tune-launch status`)"
        )
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("peft_type") == "IA3":
        from launcher.merge.ia3 import load_ia3

        return load_ia3(cfg, weights)
    refuse = {
        "peft_type": cfg.get("peft_type", "LORA") != "LORA",
        "target_parameters": bool(cfg.get("target_parameters")),
        "trainable_token_indices": bool(cfg.get("trainable_token_indices")),
        "layer_replication": bool(cfg.get("layer_replication")),
    }
    bad = [key for key, is_bad in refuse.items() if is_bad]
    if bad:
        raise RunError(
            f"{cfg_path}: {', '.join(f'{k}={cfg.get(k)!r}' for k in bad)} is not supported by "
            "the streaming merge (LoRA, DoRA, rsLoRA and IA3 only). Serve the adapter "
            "unmerged (serve.mode=lora) or merge with peft's merge_and_unload() on a machine "
            "with enough RAM for the whole model"
        )
    from safetensors.torch import load_file

    rslora = bool(cfg.get("use_rslora"))
    alpha_pattern: dict[str, float] = cfg.get("alpha_pattern") or {}
    lora: dict[str, LoraWeight] = {}
    replace: dict[str, torch.Tensor] = {}
    for key, tensor in load_file(str(weights)).items():
        if not key.startswith(PEFT_PREFIX):
            raise RunError(f"{weights}: unexpected key {key!r} (not under {PEFT_PREFIX!r})")
        name = key.removeprefix(PEFT_PREFIX)
        dora = _DORA_KEY.match(name)
        if dora is not None:
            lora.setdefault(dora["mod"], LoraWeight(dora["mod"])).magnitude = tensor
            continue
        match = _LORA_KEY.match(name) or _EMB_KEY.match(name)
        if match is None:
            if ".lora_" in name or "lora_magnitude_vector" in name:
                raise RunError(f"{weights}: unsupported adapter tensor {key!r}")
            # save_embedding_layers stores a targeted embedding's own weight as base_layer
            replace[name.replace(".base_layer.", ".")] = tensor
            continue
        mod, part = match["mod"], match["part"]
        entry = lora.setdefault(mod, LoraWeight(mod))
        if part.startswith("lora_embedding"):
            entry.transpose = True  # delta = (B @ A).T for nn.Embedding
        else:
            entry.transpose = bool(cfg.get("fan_in_fan_out"))
        if match.groupdict().get("param") == "bias":
            entry.bias = tensor
        elif part.endswith("A"):
            entry.a = tensor
        else:
            entry.b = tensor
    for mod, entry in lora.items():
        if entry.a is None or entry.b is None:
            raise RunError(f"{weights}: {mod} has only one of lora_A / lora_B")
        if entry.magnitude is not None and entry.transpose:
            raise RunError(
                f"{weights}: DoRA on {mod} (an embedding or a fan_in_fan_out layer) is not "
                "supported by the streaming merge: merge with peft's merge_and_unload()"
            )
        r = entry.a.shape[0]
        pattern = _pattern_key(alpha_pattern, mod)
        alpha = float(alpha_pattern[pattern] if pattern else cfg["lora_alpha"])
        entry.scale = alpha / r**0.5 if rslora else alpha / r
    return Adapter(lora, replace)


# --------------------------------------------------------------------------------------------
# Streaming merge


def _candidates(name: str, prefix: str) -> list[str]:
    """Checkpoint keys a model parameter name may be stored under (with/without the prefix)."""
    if name.startswith(prefix + "."):
        return [name, name.removeprefix(prefix + ".")]
    return [name, f"{prefix}.{name}"]


def find_key(name: str, specs: dict[str, TensorSpec], prefix: str) -> str | None:
    """The checkpoint key `name` is stored under, or None."""
    return next((c for c in _candidates(name, prefix) if c in specs), None)


@dataclass
class Bound:
    """An adapter resolved against a checkpoint's keys."""

    lora: dict[str, Any]  # checkpoint key of a weight -> its change (add_to)
    lora_bias: dict[str, Any]  # checkpoint key of a bias -> its change (bias_of)
    replace: dict[str, torch.Tensor]  # checkpoint key -> trained tensor
    extra: dict[str, torch.Tensor]  # trained tensors the base lacks (e.g. a new head)


def bind(adapter: Adapter, specs: dict[str, TensorSpec], prefix: str) -> Bound:
    bound = Bound({}, {}, {}, {})
    for mod, entry in adapter.lora.items():
        key = find_key(f"{mod}.weight", specs, prefix)
        if key is None:
            raise RunError(
                f"the adapter adapts {mod} but the base has no {mod}.weight (nor under another "
                "prefix): the adapter was trained on a different base model"
            )
        bound.lora[key] = entry
        bias = find_key(f"{mod}.bias", specs, prefix)
        if entry.changes_bias(bias is not None):
            if bias is None:
                raise RunError(f"lora_bias for {mod}, but the base has no {mod}.bias")
            bound.lora_bias[bias] = entry
    for name, tensor in adapter.replace.items():
        key = find_key(name, specs, prefix)
        if key is None:
            bound.extra[name] = tensor
        elif tuple(tensor.shape) != specs[key].shape:
            raise RunError(
                f"the adapter's {name} has shape {tuple(tensor.shape)}, the base's {key} "
                f"{specs[key].shape} (resized embeddings are not supported by the merge)"
            )
        else:
            bound.replace[key] = tensor
    return bound


def _out_dtype(st_dtype: str, dtype: torch.dtype) -> str:
    return TORCH_TO_ST[dtype] if st_dtype in ST_FLOAT else st_dtype


def stream_merge(
    base: Checkpoint,
    bound: Bound,
    out_dir: Path,
    *,
    dtype: torch.dtype,
    max_bytes: int,
    roundtrip: Callable[[torch.Tensor], torch.Tensor] | None = None,
    quantized: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Write base + adapter into out_dir shard by shard; returns the index."""
    specs = base.specs()
    plan = [TensorSpec(n, _out_dtype(s.dtype, dtype), s.shape) for n, s in specs.items()]
    plan += [
        TensorSpec(n, _out_dtype(TORCH_TO_ST[t.dtype], dtype), tuple(t.shape))
        for n, t in bound.extra.items()
    ]
    writer = ShardWriter(out_dir, plan, max_bytes)
    log.info(
        "merging %d base tensors from %d file(s) into %d shard(s) of at most %.2f GB: "
        "%d adapted weights, %d replaced, %d added, %d through the NF4 round trip",
        len(specs),
        len(base.files),
        len(writer.shards),
        max_bytes / 1e9,
        len(bound.lora),
        len(bound.replace),
        len(bound.extra),
        len(quantized) if roundtrip else 0,
    )
    try:
        for stored in base.iter_stored():
            if _unchanged(stored.spec, bound, dtype, quantized if roundtrip else frozenset()):
                writer.copy(stored)  # its bytes, file to file: never a tensor in memory
            else:
                writer.write(stored.spec.name, _merged(stored, bound, dtype, roundtrip, quantized))
        for name, tensor in bound.extra.items():
            writer.write(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def _unchanged(
    spec: TensorSpec, bound: Bound, dtype: torch.dtype, quantized: frozenset[str]
) -> bool:
    """The merge writes this base tensor exactly as it is stored (no LoRA, no replacement, no
    NF4 round trip, already in the output dtype)."""
    name = spec.name
    touched = name in bound.lora or name in bound.lora_bias or name in bound.replace
    return not touched and name not in quantized and _out_dtype(spec.dtype, dtype) == spec.dtype


def _merged(
    stored: StoredTensor,
    bound: Bound,
    dtype: torch.dtype,
    roundtrip: Callable[[torch.Tensor], torch.Tensor] | None,
    quantized: frozenset[str],
) -> torch.Tensor:
    name = stored.spec.name
    if name in bound.replace:
        tensor = bound.replace[name]  # the base's own tensor is not even read
    else:
        tensor = stored.read()
        if roundtrip is not None and name in quantized:
            tensor = roundtrip(tensor)
    if not tensor.is_floating_point():
        return tensor
    tensor = tensor.to(dtype)  # what training saw: the base loaded in model.dtype
    if name in bound.lora:
        return bound.lora[name].add_to(tensor.to(torch.float32, copy=True)).to(dtype)
    if name in bound.lora_bias:
        return bound.lora_bias[name].bias_of(tensor).to(dtype)
    return tensor


def nf4_roundtrip_fn(
    dtype: torch.dtype, quant_type: str, double_quant: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """W -> dequantize_4bit(quantize_4bit(W in model dtype)), as bitsandbytes does at load."""
    import bitsandbytes.functional as bnbf

    def roundtrip(weight: torch.Tensor) -> torch.Tensor:
        packed, state = bnbf.quantize_4bit(
            weight.to(dtype).contiguous(),
            blocksize=64,
            compress_statistics=double_quant,
            quant_type=quant_type,
        )
        return bnbf.dequantize_4bit(packed, state)

    return roundtrip


def auto_class(task: str) -> Any:
    import transformers

    if task == "sequence_classification":
        return transformers.AutoModelForSequenceClassification
    return transformers.AutoModelForCausalLM


def quantized_weights(base_dir: Path, task: str, trust_remote_code: bool = False) -> set[str]:
    """Parameter names bitsandbytes stores in 4 bits when transformers loads this base.

    transformers' own rule (integrations/bitsandbytes.replace_with_bnb_linear): every plain
    nn.Linear except the output embedding, tied and last modules and _keep_in_fp32_modules.
    The model is built on the meta device: no weight is allocated.
    """
    import transformers
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    config = transformers.AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = auto_class(task).from_config(config, trust_remote_code=trust_remote_code)
    skip = list(get_keys_to_not_convert(model))
    skip += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return {
        f"{name}.weight"
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and should_convert_module(name, skip)
    }
