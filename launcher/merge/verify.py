"""The merge's check: the merged model answers as base + adapter does.

Both are loaded in fp32, one after the other (peft's PeftModel for base + adapter, with the
QLoRA NF4 round trip applied to the base when the merge applied it), and their logits are
compared on a few prompts tokenized with final/'s tokenizer. merge_run calls `verify` before
publishing when the model is at most VERIFY_MAX_BYTES in fp32; `verify_run` checks a
published RUN_DIR/merged on a machine with the memory for it.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from launcher.config.plan import Plan
from launcher.errors import RunError
from launcher.merge.inputs import TORCH_DTYPES, resolve_base, roundtrip_for
from launcher.merge.lora import auto_class
from launcher.merge.safetensors_stream import open_checkpoint
from launcher.rundir import RunDir

log = logging.getLogger(__name__)

VERIFY_MAX_BYTES = 4 * 1024**3  # verification holds one model in fp32 at a time
PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about a good movie.",
    "Repeat the word hello three times.",
)


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


def should_verify(params: int, verify_merge: bool | None) -> bool:
    """verify_merge when given, else whether `params` parameters fit VERIFY_MAX_BYTES in fp32."""
    if verify_merge is not None:
        return verify_merge
    if params * 4 <= VERIFY_MAX_BYTES:
        return True
    log.info(
        "skipping verification: %.2f B parameters need %.1f GiB in fp32, above the "
        "%.1f GiB limit (run launcher.merge.verify.verify_run on a larger machine to check)",
        params / 1e9,
        params * 4 / 2**30,
        VERIFY_MAX_BYTES / 2**30,
    )
    return False


def verify_run(run_dir: Path) -> float:
    """Verify an existing RUN_DIR/merged against base + adapter (RunError on mismatch)."""
    run = RunDir(Path(run_dir).resolve())
    plan = run.load_plan()
    if plan.recipe.method.kind == "full":
        raise RunError("method=full has no adapter to verify the merged model against")
    base_dir = resolve_base(plan, run)
    roundtrip, quantized = roundtrip_for(plan, base_dir, open_checkpoint(base_dir).specs())
    return verify(plan, run.merged, base_dir, run.final, roundtrip, quantized)
