"""What a merge starts from, and how it knows it has nothing to do.

- resolve_base: the base model's local directory (RUN_DIR/base, a local path, or the offline
  Hugging Face cache).
- aux_sources / copy_aux: the tokenizer and config files written beside the merged weights.
- settings / sha256 / fingerprint: the inputs that decide the output, hashed; up_to_date
  compares them with the fingerprint in RUN_DIR/merged's COMPLETE marker.
- roundtrip_for: the QLoRA NF4 round trip the merge and its verification apply to the base.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from launcher.config.plan import Plan
from launcher.errors import RunError
from launcher.merge.lora import MODEL_PREFIX, find_key, nf4_roundtrip_fn, quantized_weights
from launcher.merge.safetensors_stream import TensorSpec
from launcher.rundir import TRAIN_CONTRACT, RunDir

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the merged output changes for identical inputs
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HF_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
OTHER_FILES = ("config.json", "generation_config.json", TRAIN_CONTRACT)


def resolve_base(plan: Plan, run: RunDir) -> Path:
    """Local directory of the base model: RUN_DIR/base, a local path, or the offline HF cache."""
    if plan.tiny_arch:
        if not run.base.is_dir():
            raise RunError(
                f"{run.base} does not exist: the tiny base is built when the run is submitted"
            )
        return run.base
    source = plan.base_model
    if Path(source).is_dir():
        return Path(source)
    if source.startswith(("/", "./", "../", "~")):
        raise RunError(f"base model directory {source} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, local_files_only=True))
    except Exception as exc:
        raise RunError(
            f"base model {source!r} is not a local directory and not in the local Hugging Face "
            f"cache ({type(exc).__name__}). Download it where there is network "
            f"(`hf download {source}`) into HF_HOME, or set model.name_or_path to a local copy"
        ) from None


def model_prefix(plan: Plan) -> str:
    """The module prefix of the base model's weights (`model` for the decoders)."""
    return MODEL_PREFIX.get(str((plan.model_shape or {}).get("model_type")), "model")


def aux_sources(dirs: list[Path]) -> dict[str, Path]:
    """name -> file to copy: tokenizer files as one group from the first dir holding a
    tokenizer (final/ first: training's tokenizer, template and EOS), others from the first
    dir that has each."""
    out: dict[str, Path] = {}
    for d in dirs:
        if any((d / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
            out.update({n: d / n for n in TOKENIZER_FILES if (d / n).is_file()})
            break
    for name in OTHER_FILES:
        found = next((d / name for d in dirs if (d / name).is_file()), None)
        if found:
            out[name] = found
    return out


def copy_aux(sources: dict[str, Path], out_dir: Path, dtype: str, config: dict[str, Any]) -> None:
    """Copy tokenizer/config files; config.json gets the merged dtype and loses quantization."""
    for name, src in sources.items():
        if name == "config.json":
            cfg = json.loads(src.read_text(encoding="utf-8"))
            cfg.pop("torch_dtype", None)
            cfg.pop("quantization_config", None)
            cfg["dtype"] = HF_DTYPE_NAMES[dtype]
            cfg.update(config)
            (out_dir / name).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(src, out_dir / name)
    missing = [n for n in ("config.json", "tokenizer_config.json") if n not in sources]
    if missing:
        log.warning("no %s found in final/ or the base to copy", ", ".join(missing))
    if TRAIN_CONTRACT not in sources:
        log.warning("final/ has no %s: serving will not know training's EOS ids", TRAIN_CONTRACT)


def settings(plan: Plan) -> dict[str, Any]:
    """The recipe's settings that change the merged output."""
    recipe = plan.recipe
    out: dict[str, Any] = {
        "format": FORMAT,
        "method": recipe.method.kind,
        "dtype": recipe.model.dtype,
        "shard_size_gb": recipe.merge.shard_size_gb,
    }
    if recipe.method.kind == "qlora":
        out["nf4_roundtrip"] = recipe.merge.nf4_roundtrip
        out["quant"] = recipe.method.quant.model_dump()
    return out


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def up_to_date(run: RunDir, digest: str, force: bool) -> bool:
    """True when RUN_DIR/merged was published from inputs with this fingerprint (and `force`
    is off); otherwise an empty RUN_DIR/merged.tmp is made ready for the new output."""
    marker = RunDir.read_marker(run.merged)
    current = marker is not None and marker.get("fingerprint") == digest
    if current and not force:
        log.info(
            "%s is complete and its inputs are unchanged: nothing to do (--force redoes it)",
            run.merged,
        )
        return True
    if run.merged.exists():
        log.info(
            "%s %s: merging again", run.merged, "forced" if current else "is stale or incomplete"
        )
    shutil.rmtree(run.merged_staging, ignore_errors=True)
    run.merged_staging.mkdir()
    return False


def roundtrip_for(
    plan: Plan, base_dir: Path, specs: dict[str, TensorSpec]
) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, frozenset[str]]:
    """With qlora and merge.nf4_roundtrip: the NF4 round trip and the base's keys it applies to
    (the weights bitsandbytes quantizes when training loads the base); else (None, {})."""
    recipe = plan.recipe
    if recipe.method.kind != "qlora" or not recipe.merge.nf4_roundtrip:
        return None, frozenset()
    prefix = model_prefix(plan)
    names = quantized_weights(base_dir, recipe.model.task, recipe.model.trust_remote_code)
    keys = {find_key(n, specs, prefix) for n in names}
    fn = nf4_roundtrip_fn(
        TORCH_DTYPES[recipe.model.dtype], recipe.method.quant.type, recipe.method.quant.double_quant
    )
    return fn, frozenset(k for k in keys if k)
