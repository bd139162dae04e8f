"""method=full: the trained model is already whole, or is consolidated from a ZeRO checkpoint.

final/ normally holds the full model in safetensors: it is served as it is (no copy of a
140 GB model). Only when it holds no safetensors weights but a DeepSpeed ZeRO checkpoint
exists (final/ or the newest COMPLETE checkpoints/checkpoint-N with a `latest` tag file) is
that checkpoint consolidated with deepspeed.utils.zero_to_fp32 into RUN_DIR/merged.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from launcher.config.plan import Plan
from launcher.errors import RunError
from launcher.merge.inputs import (
    TORCH_DTYPES,
    aux_sources,
    copy_aux,
    fingerprint,
    resolve_base,
    settings,
    sha256,
    up_to_date,
)
from launcher.merge.safetensors_stream import INDEX_NAME, SINGLE_NAME
from launcher.rundir import COMPLETE, RunDir

log = logging.getLogger(__name__)

ZERO_TAG_FILE = "latest"  # DeepSpeed's pointer to the tag folder of a ZeRO checkpoint


def has_weights(path: Path) -> bool:
    return (path / INDEX_NAME).is_file() or (path / SINGLE_NAME).is_file()


def zero_checkpoint(run: RunDir) -> Path | None:
    """A DeepSpeed ZeRO checkpoint: final/, else the newest complete checkpoint holding one."""
    if (run.final / ZERO_TAG_FILE).is_file():
        return run.final
    zero = [c for c in run.list_checkpoints() if c.complete and (c.path / ZERO_TAG_FILE).is_file()]
    return zero[-1].path if zero else None


def merge_full(plan: Plan, run: RunDir, force: bool) -> Path:
    """RUN_DIR/final when it holds the model, else RUN_DIR/merged consolidated from ZeRO."""
    if has_weights(run.final):
        log.info(
            "method=full: %s holds the full model; nothing to merge, serve it as is", run.final
        )
        return run.final
    ckpt = zero_checkpoint(run)
    if ckpt is None:
        raise RunError(
            f"method=full: {run.final} holds no safetensors weights and no COMPLETE DeepSpeed "
            f"checkpoint was found in {run.checkpoints}: has training finished?"
        )
    dirs = [run.final, ckpt]
    with contextlib.suppress(RunError):  # the base only supplies files final/ lacks
        dirs.append(resolve_base(plan, run))
    sources = aux_sources([d for d in dirs if d.is_dir()])
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != COMPLETE)
    inputs = {
        **settings(plan),
        "zero_checkpoint": [(str(p.relative_to(ckpt)), p.stat().st_size) for p in files],
        "files": {n: sha256(p) for n, p in sorted(sources.items())},
    }
    digest = fingerprint(inputs)
    if up_to_date(run, digest, force):
        return run.merged
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_state_dict

    recipe = plan.recipe
    log.info("method=full: consolidating the ZeRO checkpoint %s into %s", ckpt, run.merged)
    convert_zero_checkpoint_to_state_dict(
        str(ckpt),
        str(run.merged_staging),
        dtype=TORCH_DTYPES[recipe.model.dtype],
        max_shard_size=int(recipe.merge.shard_size_gb * 1e9),
        safe_serialization=True,
    )
    copy_aux(sources, run.merged_staging, recipe.model.dtype, {})
    RunDir.publish(
        run.merged_staging,
        run.merged,
        {"fingerprint": digest, "inputs": inputs, "source": str(ckpt)},
    )
    return run.merged
