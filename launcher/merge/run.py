"""`tune-launch merge RUN_DIR`: the trained result turned into one servable model directory.

By method (plan.recipe.method.kind):
- lora:  base + adapter merged tensor by tensor (launcher/lora_merge.py), written to
         RUN_DIR/merged in model.dtype as safetensors shards of at most merge.shard_size_gb
         plus model.safetensors.index.json, with config, tokenizer and generation config.
- qlora: the same onto the base read in 16 bits from its safetensors. With merge.nf4_roundtrip
         every weight bitsandbytes quantizes when training loads the base (transformers' rule)
         first goes through quantize_4bit/dequantize_4bit with the training's settings, so the
         merged model equals the 4-bit base + adapter the adapter was trained against.
- full:  final/ already holds the full model: merge returns RUN_DIR/final untouched (no copy of
         a 140 GB model). Only when final/ holds no safetensors weights but a DeepSpeed ZeRO
         checkpoint exists (final/ or the newest COMPLETE checkpoints/checkpoint-N) is it
         consolidated with deepspeed.utils.zero_to_fp32 into RUN_DIR/merged, which is returned.
merge_run's return value is the directory to serve.

Output is built in RUN_DIR/merged.tmp, verified, marked COMPLETE (a fingerprint of the inputs:
adapter sha256, base shard names/sizes, merge settings, copied files), then renamed to merged/.
Merging again with the same fingerprint does nothing; force=True redoes it. Verification loads
the merged model and base + adapter (peft) in fp32, one after the other, and compares their
logits on a few prompts (tokenized with final/'s tokenizer); it is skipped, with a log line,
when the model is above VERIFY_MAX_BYTES in fp32.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from launcher.config.plan import Plan
from launcher.errors import RunError
from launcher.merge.lora import (
    MODEL_PREFIX,
    LoraWeight,
    auto_class,
    bind,
    find_key,
    load_adapter,
    nf4_roundtrip_fn,
    quantized_weights,
    stream_merge,
)
from launcher.merge.safetensors_stream import INDEX_NAME, SINGLE_NAME, TensorSpec, open_checkpoint
from launcher.rundir import RunDir

# the merge's maths lives in launcher.lora_merge; these names stay importable from here
__all__ = ["LoraWeight", "merge_run", "nf4_roundtrip_fn", "quantized_weights", "verify_run"]

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the merged output changes for identical inputs
VERIFY_MAX_BYTES = 4 * 1024**3  # verification holds one model in fp32 at a time
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
OTHER_FILES = ("config.json", "generation_config.json", "train_contract.json")
PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about a good movie.",
    "Repeat the word hello three times.",
)


# --------------------------------------------------------------------------------------------
# Run directory plumbing: base resolution, copied files, fingerprint, lock, logging


def resolve_base(plan: Plan, run_dir: Path) -> Path:
    """Local directory of the base model: RUN_DIR/base, a local path, or the offline HF cache."""
    name = plan.recipe.model.name_or_path
    if name.startswith("tiny:"):
        path = run_dir / "base"
        if not path.is_dir():
            raise RunError(f"{path} does not exist: the tiny base is built when training starts")
        return path
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
    if "train_contract.json" not in sources:
        log.warning("final/ has no train_contract.json: serving will not know training's EOS ids")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _digest(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def is_complete(out: Path, digest: str) -> bool:
    try:
        marker = json.loads((out / "COMPLETE").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(marker.get("fingerprint") == digest)


def publish(tmp: Path, out: Path, marker: dict[str, Any]) -> None:
    """Mark tmp COMPLETE, then swap it in for out (the old one is removed after the rename)."""
    (tmp / "COMPLETE").write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    old = out.with_name(out.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def _logging_to(run_dir: Path) -> Iterator[None]:
    """Merge logs go to RUN_DIR/logs/merge.log, and to stderr when nothing else shows them."""
    logger = logging.getLogger("launcher")
    (run_dir / "logs").mkdir(exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(run_dir / "logs" / "merge.log")]
    if not logging.getLogger().handlers and not logger.handlers:
        handlers.append(logging.StreamHandler(sys.stderr))
    fmt = logging.Formatter("%(asctime)s %(levelname)s merge: %(message)s")
    old_level = logger.level
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for h in handlers:
            logger.removeHandler(h)
            h.close()
        logger.setLevel(old_level)


def peak_rss_mib() -> float:
    """This process's peak resident set (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mib() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss) / 2**20


# --------------------------------------------------------------------------------------------
# Verification


def _prompts(tokenizer: Any) -> list[dict[str, torch.Tensor]]:
    batches = []
    for text in PROMPTS:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
            batches.append(tokenizer(text, add_special_tokens=False, return_tensors="pt"))
        else:
            batches.append(tokenizer(text, return_tensors="pt"))
    return [dict(b) for b in batches]


def verify(
    plan: Plan,
    merged: Path,
    base_dir: Path,
    final: Path,
    roundtrip: Callable[[torch.Tensor], torch.Tensor] | None = None,
    quantized: frozenset[str] = frozenset(),
) -> float:
    """Max |logits difference| of merged vs base + adapter (fp32); RunError above tolerance."""
    import transformers
    from peft import PeftModel

    tolerance = plan.recipe.merge.verify_tolerance
    model_cfg = plan.recipe.model
    auto = auto_class(model_cfg.task)
    tok_dir = final if (final / "tokenizer_config.json").is_file() else base_dir
    batches = _prompts(transformers.AutoTokenizer.from_pretrained(tok_dir))
    kwargs: dict[str, Any] = {"trust_remote_code": model_cfg.trust_remote_code}

    base = auto.from_pretrained(base_dir, dtype=TORCH_DTYPES[model_cfg.dtype], **kwargs)
    if roundtrip is not None:
        with torch.no_grad():
            for name, param in base.named_parameters():
                if name in quantized:
                    param.data = roundtrip(param.data)
    reference = PeftModel.from_pretrained(base.float(), str(final)).eval()
    with torch.no_grad():
        expected = [reference(**b).logits for b in batches]
    del reference, base
    gc.collect()
    model = auto.from_pretrained(merged, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        diff = max(
            float((model(**b).logits - e).abs().max())
            for b, e in zip(batches, expected, strict=True)
        )
    del model
    gc.collect()
    if not diff <= tolerance:
        raise RunError(
            f"merge verification failed: the merged model's logits differ from base + adapter "
            f"by up to {diff:.3g} over {len(batches)} prompts, above "
            f"merge.verify_tolerance={tolerance:g}. The output in {merged} is kept for "
            "inspection and not published. A wrong merge (adapter from another base, bad "
            "scaling) differs by the adapter's whole effect; if this is 16-bit rounding, raise "
            "merge.verify_tolerance"
        )
    log.info(
        "verified: max |logits difference| %.3g <= merge.verify_tolerance=%g over %d prompts",
        diff,
        tolerance,
        len(batches),
    )
    return diff


def verify_run(run_dir: Path) -> float:
    """Verify an existing RUN_DIR/merged against base + adapter (RunError on mismatch)."""
    run_dir = Path(run_dir).resolve()
    plan = RunDir(run_dir).load_plan()
    if plan.recipe.method.kind == "full":
        raise RunError("method=full has no adapter to verify the merged model against")
    base_dir = resolve_base(plan, run_dir)
    roundtrip, quantized = _roundtrip_for(plan, base_dir, open_checkpoint(base_dir).specs())
    return verify(plan, run_dir / "merged", base_dir, run_dir / "final", roundtrip, quantized)


# --------------------------------------------------------------------------------------------
# Entry point


def merge_run(run_dir: Path, force: bool = False, *, verify_merge: bool | None = None) -> Path:
    """Merge RUN_DIR's training result into a servable model; returns the directory to serve.

    lora/qlora -> RUN_DIR/merged. full -> RUN_DIR/final, or RUN_DIR/merged when it had to be
    consolidated from a ZeRO checkpoint. verify_merge: None checks logits when the model is
    at most VERIFY_MAX_BYTES in fp32; True/False force it on/off.
    """
    run_dir = Path(run_dir).resolve()
    if not (run_dir / "plan.json").is_file():
        raise RunError(f"{run_dir} is not a run directory (no plan.json)")
    plan = RunDir(run_dir).load_plan()
    with _logging_to(run_dir):
        start = time.monotonic()
        if plan.recipe.method.kind == "full":
            out = _merge_full(plan, run_dir, force)
        else:
            out = _merge_adapter(plan, run_dir, force, verify_merge)
        log.info(
            "merge of %s: %s in %.1f s, peak RSS %.0f MiB (process lifetime)",
            run_dir.name,
            out,
            time.monotonic() - start,
            peak_rss_mib(),
        )
        return out


def _settings(plan: Plan) -> dict[str, Any]:
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


def _roundtrip_for(
    plan: Plan, base_dir: Path, specs: dict[str, TensorSpec]
) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, frozenset[str]]:
    recipe = plan.recipe
    if recipe.method.kind != "qlora" or not recipe.merge.nf4_roundtrip:
        return None, frozenset()
    prefix = MODEL_PREFIX.get(str((plan.model_shape or {}).get("model_type")), "model")
    names = quantized_weights(base_dir, recipe.model.task, recipe.model.trust_remote_code)
    keys = {find_key(n, specs, prefix) for n in names}
    fn = nf4_roundtrip_fn(
        TORCH_DTYPES[recipe.model.dtype], recipe.method.quant.type, recipe.method.quant.double_quant
    )
    return fn, frozenset(k for k in keys if k)


def _merge_adapter(plan: Plan, run_dir: Path, force: bool, verify_merge: bool | None) -> Path:
    final, out, tmp = run_dir / "final", run_dir / "merged", run_dir / "merged.tmp"
    adapter = load_adapter(final)
    base_dir = resolve_base(plan, run_dir)
    base = open_checkpoint(base_dir)
    sources = aux_sources([final, base_dir])
    inputs = {
        **_settings(plan),
        "adapter": {
            n: sha256(final / n) for n in ("adapter_model.safetensors", "adapter_config.json")
        },
        "base": base.file_sizes(),
        "files": {n: sha256(p) for n, p in sorted(sources.items())},
    }
    digest = _digest(inputs)
    if not force and is_complete(out, digest):
        log.info(
            "%s is complete and its inputs are unchanged: nothing to do (--force redoes it)", out
        )
        return out
    if out.exists():
        log.info("%s %s: merging again", out, "forced" if force else "is stale or incomplete")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    recipe = plan.recipe
    specs = base.specs()
    prefix = MODEL_PREFIX.get(str((plan.model_shape or {}).get("model_type")), "model")
    bound = bind(adapter, specs, prefix)
    roundtrip, quantized = _roundtrip_for(plan, base_dir, specs)
    dtype = TORCH_DTYPES[recipe.model.dtype]
    log.info("base %s, adapter %s, rss %.0f MiB", base_dir, final, _rss_mib())
    index = stream_merge(
        base,
        bound,
        tmp,
        dtype=dtype,
        max_bytes=int(recipe.merge.shard_size_gb * 1e9),
        roundtrip=roundtrip,
        quantized=quantized,
    )
    extra_cfg = {"tie_word_embeddings": False} if "lm_head.weight" in bound.extra else {}
    copy_aux(sources, tmp, recipe.model.dtype, extra_cfg)
    log.info("streamed; peak RSS so far %.0f MiB, now %.0f MiB", peak_rss_mib(), _rss_mib())

    params = sum(s.numel for s in specs.values())
    diff: float | None = None
    if verify_merge is None:
        verify_merge = params * 4 <= VERIFY_MAX_BYTES
        if not verify_merge:
            log.info(
                "skipping verification: %.2f B parameters need %.1f GiB in fp32, above the "
                "%.1f GiB limit (run launcher.merge.verify_run on a larger machine to check)",
                params / 1e9,
                params * 4 / 2**30,
                VERIFY_MAX_BYTES / 2**30,
            )
    if verify_merge:
        diff = verify(plan, tmp, base_dir, final, roundtrip, quantized)
    marker = {
        "fingerprint": digest,
        "inputs": inputs,
        "shards": sorted(set(index["weight_map"].values())),
        "total_size": index["metadata"]["total_size"],
        "verified_max_logit_diff": diff,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    publish(tmp, out, marker)
    return out


def _has_weights(path: Path) -> bool:
    return (path / INDEX_NAME).is_file() or (path / SINGLE_NAME).is_file()


def zero_checkpoint(run_dir: Path) -> Path | None:
    """A DeepSpeed ZeRO checkpoint (a dir with a `latest` tag file): final/, else the newest
    COMPLETE checkpoints/checkpoint-N."""
    final = run_dir / "final"
    if (final / "latest").is_file():
        return final
    ckpts = []
    for path in (run_dir / "checkpoints").glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if step.isdigit() and (path / "COMPLETE").is_file() and (path / "latest").is_file():
            ckpts.append((int(step), path))
    return max(ckpts)[1] if ckpts else None


def _merge_full(plan: Plan, run_dir: Path, force: bool) -> Path:
    final, out, tmp = run_dir / "final", run_dir / "merged", run_dir / "merged.tmp"
    if _has_weights(final):
        log.info("method=full: %s holds the full model; nothing to merge, serve it as is", final)
        return final
    ckpt = zero_checkpoint(run_dir)
    if ckpt is None:
        raise RunError(
            f"method=full: {final} holds no safetensors weights and no COMPLETE DeepSpeed "
            f"checkpoint was found in {run_dir / 'checkpoints'}: has training finished?"
        )
    dirs = [final, ckpt]
    with contextlib.suppress(RunError):  # the base only supplies files final/ lacks
        dirs.append(resolve_base(plan, run_dir))
    sources = aux_sources([d for d in dirs if d.is_dir()])
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != "COMPLETE")
    inputs = {
        **_settings(plan),
        "zero_checkpoint": [(str(p.relative_to(ckpt)), p.stat().st_size) for p in files],
        "files": {n: sha256(p) for n, p in sorted(sources.items())},
    }
    digest = _digest(inputs)
    if not force and is_complete(out, digest):
        log.info("%s is complete and its inputs are unchanged: nothing to do", out)
        return out
    if tmp.exists():
        shutil.rmtree(tmp)
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_state_dict

    recipe = plan.recipe
    log.info("method=full: consolidating the ZeRO checkpoint %s into %s", ckpt, out)
    convert_zero_checkpoint_to_state_dict(
        str(ckpt),
        str(tmp),
        dtype=TORCH_DTYPES[recipe.model.dtype],
        max_shard_size=int(recipe.merge.shard_size_gb * 1e9),
        safe_serialization=True,
    )
    copy_aux(sources, tmp, recipe.model.dtype, {})
    publish(tmp, out, {"fingerprint": digest, "inputs": inputs, "source": str(ckpt)})
    return out
