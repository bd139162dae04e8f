"""Part 3 of scripts/gpu_check.sh: FSDP2 on the one GPU, through tune-launch and the rank
code a multi-GPU run uses.

For LoRA and for QLoRA on the tiny Llama (distributed.strategy=fsdp,
resources.accelerator=gpu, gpus_per_node=1):
- plan: `tune-launch --dry-run`: FSDP version 2 wrapping the shape's decoder-layer class,
  accelerate's FSDP config, and for QLoRA the quant-storage setting FSDP needs (packed 4-bit
  weights stored in the compute dtype, bf16, so they shard with the other parameters).
- run: the real `tune-launch` train stage: it exits 0, logs steps and writes final/.
- probe: the plan's own launch command with scripts/gpu_fsdp_probe.py in place of
  `-m launcher.train`: the rank's code reports which modules FSDP2 wrapped; every decoder
  layer must be an FSDPModule, the root, the input embedding and the output layer too
  (accelerate's own units: torchtune's custom_sharded_layers), and (QLoRA) the 4-bit weights
  stored in bf16.

On CPU the plans are checked (resolving a plan needs no GPU), the runs are skipped (accelerate
refuses FSDP on CPU hosts), and the probe runs once under DDP on gloo, where it must find the
layers and no FSDP wrapping: the GPU run is not the probe's first run.
"""

from __future__ import annotations

import json
import os
import subprocess
from functools import partial
from pathlib import Path
from typing import Any

from gpu_common import ROOT, Context, Report, launch, no_cuda, tail, tiny_sets

PROBE = ROOT / "scripts/gpu_fsdp_probe.py"
LAYERS = 2  # the tiny Llama's decoder layers


MEASURES = (
    "FSDP2 on one GPU through tune-launch (strategy fsdp, accelerator gpu, one "
    "GPU) and a probe in the rank's own code: decoder layers wrapped, QLoRA with FSDP's "
    "quant-storage setting"
)
TARGET = (
    "every decoder layer, the input embedding, the output layer and the root an FSDP2 "
    "module; QLoRA's 4-bit weights stored in bf16 and trained"
)


def fsdp_sets(ctx: Context, method: str) -> dict[str, Any]:
    """The GPU recipe, on any host (resolving its plan needs no GPU)."""
    gpu = {"resources.accelerator": "gpu", "model.dtype": "bf16", "train.precision": "bf16"}
    return tiny_sets(ctx, method=method, strategy="fsdp") | gpu


def plan_check(ctx: Context, method: str) -> dict[str, Any]:
    from launcher.rundir import RunDir

    run_dir = ctx.work / f"fsdp-plan-{method}"
    launch(run_dir, fsdp_sets(ctx, method), dry_run=True)
    plan = RunDir(run_dir).load_plan()
    fsdp = (plan.fsdp or {}).get("fsdp_config", {})
    assert fsdp.get("version") == 2, f"not FSDP2: {plan.fsdp}"
    assert fsdp.get("transformer_layer_cls_to_wrap") == ["LlamaDecoderLayer"], fsdp
    assert plan.accelerate["distributed_type"] == "FSDP", plan.accelerate
    figures: dict[str, Any] = {"fsdp_config": fsdp, "launch": plan.launch}
    if method == "qlora":
        assert plan.quant_storage == "bf16", f"quant storage {plan.quant_storage}, not bf16"
        figures |= {
            "quant_storage": plan.quant_storage,
            "quant_compute_dtype": plan.quant_compute_dtype,
        }
    return figures


def real_run(ctx: Context, method: str) -> dict[str, Any]:
    if not ctx.cuda:
        raise no_cuda("FSDP2 (accelerate refuses FSDP on CPU hosts)")
    run_dir = ctx.work / f"fsdp-run-{method}"
    figures = launch(run_dir, fsdp_sets(ctx, method))
    assert figures["final_written"], f"no final/ in {run_dir}"
    return figures


def run_probe(run_dir: Path, out: Path) -> dict[str, Any]:
    """The plan's launch command with the probe in place of `-m launcher.train`."""
    plan = json.loads((run_dir / "plan.json").read_text())
    argv = list(plan["launch"])
    at = next(i for i in range(len(argv) - 1) if argv[i : i + 2] == ["-m", "launcher.train"])
    argv[at:] = [str(PROBE), str(run_dir), str(out)]
    out.unlink(missing_ok=True)
    proc = subprocess.run(
        argv,
        cwd=ROOT,
        env={**os.environ, **plan["env"]},
        capture_output=True,
        text=True,
        timeout=900,
    )
    rank0 = run_dir / "logs/rank0.log"
    if proc.returncode != 0 or not out.is_file():
        log = rank0.read_text(errors="replace") if rank0.is_file() else ""
        raise RuntimeError(
            f"probe exited {proc.returncode}:\n{tail(proc.stdout + proc.stderr)}\n"
            f"--- rank0.log:\n{tail(log)}"
        )
    return {"launch": argv, **json.loads(out.read_text())}


def probe(ctx: Context, method: str) -> dict[str, Any]:
    if method == "qlora" and not ctx.cuda:
        raise no_cuda("FSDP2 with 4-bit weights")
    strategy = "fsdp" if ctx.cuda else "ddp"
    run_dir = ctx.work / f"fsdp-probe-{method}"
    sets = fsdp_sets(ctx, method) if ctx.cuda else tiny_sets(ctx, method=method, strategy="ddp")
    launch(run_dir, sets, dry_run=True)
    seen = run_probe(run_dir, ctx.work / f"fsdp-probe-{method}.json")
    after = seen.get("after_step_1") or seen["at_train_begin"]
    assert after["layers"] == LAYERS, f"expected {LAYERS} decoder layers: {after}"
    if strategy == "ddp":
        assert after["layers_wrapped"] == 0, after
        return {"strategy": "ddp (CPU: FSDP needs CUDA)", **seen}
    assert after["layers_wrapped"] == LAYERS, f"decoder layers not all FSDP2 modules: {after}"
    assert after["root_wrapped"], f"the root module is not an FSDP2 module: {after}"
    # torchtune's custom_sharded_layers [tok_embeddings, output]: accelerate's own units
    assert after["embedding_wrapped"], f"the input embedding is not an FSDP2 unit: {after}"
    assert after["output_wrapped"], f"the output layer is not an FSDP2 unit: {after}"
    assert after["params_dtensor"] > 0, f"no parameter is a sharded DTensor: {after}"
    if method == "qlora":
        assert after["linear4bit"] > 0, f"no 4-bit linear layer: {after}"
        assert after["quant_weight_dtypes"] == ["torch.bfloat16"], after
    return {"strategy": strategy, **seen}


def run(ctx: Context) -> None:
    report = Report(ctx, "fsdp", measures=MEASURES, target=TARGET)
    for method in ("lora", "qlora"):
        report.check(f"{method}: plan", partial(plan_check, ctx, method))
        report.check(f"{method}: tune-launch run", partial(real_run, ctx, method))
        report.check(f"{method}: wrap probe", partial(probe, ctx, method))
    probes = [c for c in report.doc["checks"] if c["name"].endswith("probe")]
    report.finish(
        wrapped_checked=ctx.cuda and all(c["status"] == "measured" for c in probes),
    )
