"""`tune-launch merge RUN_DIR`: the trained result turned into one servable model directory.

By method (plan.recipe.method.kind):
- lora:  base + adapter merged tensor by tensor (launcher/merge/lora.py), written to
         RUN_DIR/merged in model.dtype as safetensors shards of at most merge.shard_size_gb
         plus model.safetensors.index.json, with config, tokenizer and generation config.
         DoRA (method.use_dora) rescales each merged row to its trained magnitude; rsLoRA
         scales by alpha / sqrt(r).
- ia3:   each adapted weight multiplied by its learned scales (launcher/merge/ia3.py).
- prompt, prefix: nothing to merge (virtual tokens, not weights): refused, exit 2.
- qlora: as lora, onto the base read in 16 bits from its safetensors. With merge.nf4_roundtrip
         every weight bitsandbytes quantizes when training loads the base (transformers' rule)
         first goes through quantize_4bit/dequantize_4bit with the training's settings, so the
         merged model equals the 4-bit base + adapter the adapter was trained against.
- full:  final/ already holds the full model and is served as it is, or a ZeRO checkpoint is
         consolidated into RUN_DIR/merged (launcher/merge/full.py).
merge_run's return value is the directory to serve.

Output is built in RUN_DIR/merged.tmp, verified (launcher/merge/verify.py), then published
by RunDir.publish: marked COMPLETE with a fingerprint of the inputs (adapter sha256, base
shard names/sizes, merge settings, copied files; launcher/merge/inputs.py) and renamed to
merged/. Merging again with the same fingerprint does nothing; force=True redoes it. The
caller holds the run directory's lock (`tune-launch merge`, the pipeline).
"""

from __future__ import annotations

import contextlib
import logging
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from launcher.config.plan import Plan
from launcher.errors import Problem, RecipeError, RunError
from launcher.merge.full import merge_full
from launcher.merge.inputs import (
    TORCH_DTYPES,
    aux_sources,
    copy_aux,
    fingerprint,
    model_prefix,
    resolve_base,
    roundtrip_for,
    settings,
    sha256,
    up_to_date,
)
from launcher.merge.lora import bind, load_adapter, stream_merge
from launcher.merge.safetensors_stream import open_checkpoint
from launcher.merge.verify import should_verify, verify
from launcher.rundir import RunDir

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def merge_run(run_dir: Path, force: bool = False, *, verify_merge: bool | None = None) -> Path:
    """Merge RUN_DIR's training result into a servable model; returns the directory to serve.

    lora/qlora -> RUN_DIR/merged. full -> RUN_DIR/final, or RUN_DIR/merged when it had to be
    consolidated from a ZeRO checkpoint. verify_merge: None checks logits when the model is
    at most VERIFY_MAX_BYTES in fp32; True/False force it on/off.
    """
    run = RunDir(Path(run_dir).resolve())
    if not run.has_plan():
        raise RunError(f"{run.path} is not a run directory (no {run.plan_file.name})")
    plan = run.load_plan()
    refuse_unmergeable(plan)
    with _logging_to(run.merge_log):
        start = time.monotonic()
        if plan.recipe.method.kind == "full":
            out = merge_full(plan, run, force)
        else:
            out = merge_adapter(plan, run, force, verify_merge)
        log.info(
            "merge of %s: %s in %.1f s, peak RSS %.0f MiB (process lifetime)",
            run.path.name,
            out,
            time.monotonic() - start,
            peak_rss_mib(),
        )
        return out


def refuse_unmergeable(plan: Plan) -> None:
    """Exit 2 with the reason for a method that changes no weight (prompt/prefix tuning)."""
    method = plan.method
    if not method.adapter or method.mergeable:
        return
    problem = Problem(
        "method.kind",
        f"a {method.name}-tuning adapter trains virtual tokens, not weights: there is nothing "
        "to merge into the base model",
        f"use RUN_DIR/final as it is (peft's PeftModel.from_pretrained); evaluate it with "
        f"`tune-launch eval {plan.run_dir}`",
        method.name,
    )
    raise RecipeError([problem], f"merge {plan.run_dir}")


def merge_adapter(plan: Plan, run: RunDir, force: bool, verify_merge: bool | None) -> Path:
    """Stream base + adapter into RUN_DIR/merged.tmp, verify, publish as RUN_DIR/merged."""
    final, tmp = run.final, run.merged_staging
    adapter = load_adapter(final)
    base_dir = resolve_base(plan, run)
    base = open_checkpoint(base_dir)
    sources = aux_sources([final, base_dir])
    inputs = {
        **settings(plan),
        "adapter": {n: sha256(final / n) for n in ADAPTER_FILES},
        "base": base.file_sizes(),
        "files": {n: sha256(p) for n, p in sorted(sources.items())},
    }
    digest = fingerprint(inputs)
    if up_to_date(run, digest, force):
        return run.merged

    recipe = plan.recipe
    specs = base.specs()
    bound = bind(adapter, specs, model_prefix(plan))
    roundtrip, quantized = roundtrip_for(plan, base_dir, specs)
    log.info("base %s, adapter %s, rss %.0f MiB", base_dir, final, _rss_mib())
    index = stream_merge(
        base,
        bound,
        tmp,
        dtype=TORCH_DTYPES[recipe.model.dtype],
        max_bytes=int(recipe.merge.shard_size_gb * 1e9),
        roundtrip=roundtrip,
        quantized=quantized,
    )
    extra_cfg = {"tie_word_embeddings": False} if "lm_head.weight" in bound.extra else {}
    copy_aux(sources, tmp, recipe.model.dtype, extra_cfg)
    log.info("streamed; peak RSS so far %.0f MiB, now %.0f MiB", peak_rss_mib(), _rss_mib())

    diff: float | None = None
    if should_verify(sum(s.numel for s in specs.values()), verify_merge):
        diff = verify(plan, tmp, base_dir, final, roundtrip, quantized)
    marker = {
        "fingerprint": digest,
        "inputs": inputs,
        "shards": sorted(set(index["weight_map"].values())),
        "total_size": index["metadata"]["total_size"],
        "verified_max_logit_diff": diff,
    }
    RunDir.publish(tmp, run.merged, marker)
    return run.merged


@contextlib.contextmanager
def _logging_to(path: Path) -> Iterator[None]:
    """Merge logs go to `path` (RUN_DIR/logs/merge.log), and to stderr when nothing else
    shows them."""
    logger = logging.getLogger("launcher")
    path.parent.mkdir(exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(path)]
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
