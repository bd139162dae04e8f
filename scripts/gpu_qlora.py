"""Part 4 of scripts/gpu_check.sh: the QLoRA kernels themselves.

- nf4: the llama3.2-1b shape (random weights) loaded in 4-bit NF4 with double quantization,
  as tune-launch loads a QLoRA base: how many linears became Linear4bit, the quant state
  (nf4, nested = double quant), the storage dtype, the memory the weights take against the
  planner's `weight_bytes`, one layer's dequantized weight against the stored one, a forward
  pass with finite logits.
- paged: bitsandbytes' AdamW8bit and PagedAdamW8bit, one step each on 134M parameters:
  PyTorch-allocated GPU memory before and after (paged states live in CUDA unified memory,
  outside PyTorch's allocator, and can be evicted to host RAM), device free memory before and
  after, how many state tensors are paged. The states are ~0.3 GiB, far below free memory:
  never ask managed memory for more than the card has free.
- zero2 / zero3: a single-GPU tune-launch run of the tiny Llama through DeepSpeed ZeRO-2
  and ZeRO-3: QLoRA, paged 8-bit AdamW, gradient checkpointing (the 70B recipe's
  combination), ZeRO-3 with FSDP-style quant storage (the plan's bf16).
- ds-ops: DeepSpeed's FusedAdam op compiled just in time by nvcc, then one step with it.

On CPU (--cpu-smoke) nf4 loads the tiny shape, paged shows bitsandbytes' CPU fallback
(no paging without CUDA), zero2 / zero3 run on gloo, ds-ops is skipped.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from gpu_common import Context, Report, launch, no_cuda, tiny_sets

MEASURES = (
    "NF4 double-quant load, paged_adamw_8bit paging (memory before/after), "
    "ZeRO-2 and ZeRO-3 single-GPU QLoRA runs through DeepSpeed, a DeepSpeed op built by nvcc"
)
TARGET = (
    "4-bit NF4 double-quant weights that run; paged optimizer states outside "
    "PyTorch's allocator; ZeRO-2/3 runs that finish; the op builds and steps"
)


def stored_tensor(model_dir: Path, key: str) -> Any:
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    name = json.loads(index.read_text())["weight_map"][key] if index.is_file() else None
    with safe_open(str(model_dir / (name or "model.safetensors")), framework="pt") as fh:
        return fh.get_tensor(key)


def nf4(ctx: Context) -> dict[str, Any]:
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from launcher.config.arch import read_local_config, shape_from_config
    from launcher.config.memory import GIB, weight_bytes
    from launcher.train.model import keep_training_layout

    path = ctx.model("llama3.2-1b")
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    before = torch.cuda.memory_allocated() if ctx.cuda else 0
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, dtype=dtype, device_map={"": 0} if ctx.cuda else "cpu"
    )
    load_s = time.perf_counter() - start
    keep_training_layout(model)  # as the rank loads it: no CPU inference repack
    linears: list[tuple[str, Any]] = [
        (n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)
    ]
    assert linears, "no Linear4bit module: the model was not quantized"
    measured = (
        (torch.cuda.memory_allocated() - before) / GIB
        if ctx.cuda
        else model.get_memory_footprint() / GIB
    )
    states = [m.weight.quant_state for _, m in linears]
    name, first = linears[0]
    restored = bnb.functional.dequantize_4bit(first.weight.data, first.weight.quant_state)
    original = stored_tensor(path, f"{name}.weight").to(restored.device, torch.float32)
    error = ((restored.float() - original).norm() / original.norm()).item()
    ids = torch.randint(0, 1000, (1, 128), device=model.device)
    with torch.no_grad():
        logits = model(ids).logits
    shape = shape_from_config(read_local_config(str(path)) or {})
    assert shape is not None
    planned = weight_bytes(shape, "qlora", "bf16" if ctx.cuda else "fp32", True) / GIB
    return {
        "shape": "llama3.2-1b" if ctx.cuda else "tiny llama",
        "load_s": round(load_s, 1),
        "linear4bit": len(linears),
        "quant_types": sorted({s.quant_type for s in states}),
        "double_quant": all(bool(s.nested) for s in states),
        "storage_dtype": str(first.weight.dtype),
        "nf4_relative_error_one_layer": round(error, 4),
        "logits_finite": bool(torch.isfinite(logits).all()),
        "planner_weights_gib": round(planned, 3),
        "measured_weights_gib": round(measured, 3),
        "measured_as": "cuda memory_allocated by the load"
        if ctx.cuda
        else "get_memory_footprint (parameters and buffers; quant constants not counted)",
        "error_pct": round(100 * (planned / measured - 1), 1),
    }


def optimizer_step(ctx: Context, cls: Any, size: int, count: int) -> dict[str, Any]:
    import gc

    import torch

    device = "cuda" if ctx.cuda else "cpu"
    params = [torch.nn.Parameter(torch.randn(size, size, device=device)) for _ in range(count)]
    for p in params:
        p.grad = torch.randn_like(p)

    def allocated() -> float:
        if not ctx.cuda:
            return 0.0
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() / 2**20

    def free() -> float:
        return torch.cuda.mem_get_info()[0] / 2**20 if ctx.cuda else 0.0

    alloc0, free0 = allocated(), free()
    opt = cls(params, lr=1e-3)
    opt.step()
    alloc1, free1 = allocated(), free()
    states = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    row = {
        "params_m": round(size * size * count / 1e6, 1),
        "state_mib": round(sum(t.numel() * t.element_size() for t in states) / 2**20, 1),
        "paged_state_tensors": sum(bool(getattr(t, "is_paged", False)) for t in states),
        "torch_allocated_delta_mib": round(alloc1 - alloc0, 1),
        "device_free_delta_mib": round(free0 - free1, 1),
    }
    del opt, params, states
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
    return row


def paged(ctx: Context) -> dict[str, Any]:
    import bitsandbytes as bnb

    size, count = (4096, 8) if ctx.cuda else (512, 2)
    plain = optimizer_step(ctx, bnb.optim.AdamW8bit, size, count)
    paged_row = optimizer_step(ctx, bnb.optim.PagedAdamW8bit, size, count)
    figures: dict[str, Any] = {"adamw_8bit": plain, "paged_adamw_8bit": paged_row}
    if not ctx.cuda:
        assert paged_row["paged_state_tensors"] == 0, paged_row  # bitsandbytes' CPU fallback
        figures["paging"] = f"skipped: {no_cuda('paging (CUDA unified memory)')}"
        return figures
    assert paged_row["paged_state_tensors"] > 0, f"no paged state tensor: {paged_row}"
    assert paged_row["torch_allocated_delta_mib"] < 0.1 * paged_row["state_mib"], paged_row
    figures["paging"] = (
        "states in unified memory: PyTorch's allocator did not grow by them "
        "(device free memory is shared with the parts running beside this one)"
    )
    return figures


def zero_run(ctx: Context, strategy: str) -> dict[str, Any]:
    run_dir = ctx.work / f"qlora-{strategy}"
    figures = launch(run_dir, tiny_sets(ctx, method="qlora", strategy=strategy, gc=True))
    ds = json.loads((run_dir / "deepspeed.json").read_text())
    plan = json.loads((run_dir / "plan.json").read_text())
    assert figures["final_written"], f"no final/ in {run_dir}"
    return {
        "zero_stage": ds["zero_optimization"]["stage"],
        "optimizer": plan["recipe"]["train"]["optimizer"],
        "quant": plan["recipe"]["method"]["quant"],
        **figures,
    }


def ds_ops(ctx: Context) -> dict[str, Any]:
    if not ctx.cuda:
        raise no_cuda("building DeepSpeed's CUDA ops with nvcc")
    import torch
    from deepspeed.ops.adam import FusedAdam
    from deepspeed.ops.op_builder import FusedAdamBuilder

    nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True)
    builder = FusedAdamBuilder()
    start = time.perf_counter()
    builder.load()
    build_s = time.perf_counter() - start
    p = torch.nn.Parameter(torch.randn(1024, 1024, device="cuda"))
    p.grad = torch.ones_like(p)
    before = p.detach().clone()
    FusedAdam([p], lr=1e-2).step()
    return {
        "op": builder.name,
        "nvcc": nvcc.stdout.strip().splitlines()[-1] if nvcc.stdout else nvcc.stderr[-300:],
        "build_s": round(build_s, 1),
        "step_changed_weights": bool((p.detach() != before).any()),
    }


def run(ctx: Context) -> None:
    report = Report(ctx, "qlora", measures=MEASURES, target=TARGET)
    report.check("nf4 double-quant load", lambda: nf4(ctx))
    report.check("paged_adamw_8bit", lambda: paged(ctx))
    report.check("zero2 qlora run", lambda: zero_run(ctx, "zero2"))
    report.check("zero3 qlora run", lambda: zero_run(ctx, "zero3"))
    report.check("deepspeed op built by nvcc", lambda: ds_ops(ctx))
    report.finish(
        measured=[c["name"] for c in report.doc["checks"] if c["status"] == "measured"],
    )
