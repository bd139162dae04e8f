"""Per-GPU and host-RAM memory estimate for a plan (pure arithmetic, no torch).

The model, written out so a reader can check it by hand (tests/unit/test_memory.py does):
- weights: full/LoRA hold every parameter in `model.dtype`; QLoRA holds the blocks' linear
  weights in 4 bits (0.5 byte) plus the quantization constants (one fp32 absmax per 64
  weights, or with double quantization one 8-bit absmax per 64 plus one fp32 per 256 blocks),
  the rest (embeddings, norms, lm_head) in the compute dtype; an 8-bit base (method.quant.bits)
  1 byte a weight plus one fp32 scale per output row. ZeRO-3/FSDP divide by the world size.
- trainable parameters: every one (full), or what the method trains (launcher/config/methods.py:
  LoRA A/B matrices and DoRA magnitudes, IA3 scales, prompt/prefix virtual tokens) plus the
  trainable copy peft makes of each module in method.modules_to_save that the shape knows
  (ModelShape.module_params: embeddings, lm_head, classifier heads; the plan warns about
  any other name, which is left out).
- gradients: full fine-tuning 2 bytes per parameter in bf16/fp16 precision, 4 in fp32;
  adapters in their dtype (the plan's adapter_dtype). ZeRO-2/3 shard them.
- optimizer: AdamW 8 bytes per trainable parameter (two fp32 moments; torch's AdamW without
  DeepSpeed keeps an adapter's moments in its dtype: 4 for bf16 adapters), the 8-bit ones 2,
  adafactor ~4 bytes per row+column (taken as 0.5 byte per parameter); plus a 4-byte fp32 master
  copy when trainable weights are 16-bit under DeepSpeed. ZeRO shards them; offload moves them
  to host RAM.
- activations (per layer, per micro batch b and sequence s, hidden h, a heads, in 16-bit,
  Korthikanti et al. 2022): s*b*h*34 bytes, plus 5*a*s^2*b for the attention scores that only
  eager attention stores (sdpa and flash_attention_2 compute them in tiles, never the s x s
  matrix); with checkpointing, the 2*s*b*h bytes of each layer's input plus one layer's full
  activations. Logits add b*s*vocab*(2 + 4 + 4) (16-bit logits, their fp32 upcast and its
  gradient: the rank computes the model's own, unchunked loss, launcher/train/callbacks.py).
  s is data.max_seq_len: with packing every sequence is that long; without it a batch pads to
  its longest row, so it is the worst batch, the one that decides out-of-memory.
- runtime: 1 GiB (CUDA context, allocator slack, NCCL buffers) on GPU; 0 on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from launcher.config import methods
from launcher.config.arch import ModelShape
from launcher.config.strategies import get_strategy

GIB = 1024**3
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class MemoryInputs:
    shape: ModelShape
    method: str  # method.kind: full | lora | qlora | ia3 | prompt | prefix
    dtype: str
    precision: str
    lora_r: int
    lora_targets: list[str] | str
    optimizer: str
    strategy: str
    world_size: int
    gpus_per_node: int
    micro_batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    offload_optimizer: bool
    offload_params: bool
    double_quant: bool
    on_gpu: bool
    merge_shard_gb: float
    modules_to_save: tuple[str, ...] = ()
    num_labels: int = 2
    attention: str = "sdpa"  # eager | sdpa | flash_attention_2 (model.attn_implementation)
    use_dora: bool = False
    num_virtual_tokens: int = 20
    adapter_dtype: str = "fp32"  # the plan's method.adapter_dtype (adapter methods)
    quant_bits: int = 4  # qlora: method.quant.bits


def weight_bytes(
    shape: ModelShape, method: str, dtype: str, double_quant: bool, bits: int = 4
) -> float:
    total = shape.total_params()
    if method != "qlora":
        return total * DTYPE_BYTES[dtype]
    quantized = shape.quantizable_params()
    if bits == 8:  # LLM.int8: 1 byte a weight, one fp32 scale per output row (~ per input width)
        return (
            quantized * 1
            + quantized / shape.hidden_size * 4
            + (total - quantized) * DTYPE_BYTES[dtype]
        )
    blocks = quantized / 64
    constants = blocks * 1 + (blocks / 256) * 4 if double_quant else blocks * 4
    return quantized * 0.5 + constants + (total - quantized) * DTYPE_BYTES[dtype]


def trainable_params(m: MemoryInputs) -> int:
    if m.method == "full":
        return m.shape.total_params()
    saved = (m.shape.module_params(name, m.num_labels) for name in m.modules_to_save)
    adapter = methods.trainable_params(
        m.shape,
        m.method,
        r=m.lora_r,
        targets=m.lora_targets,
        use_dora=m.use_dora,
        num_virtual_tokens=m.num_virtual_tokens,
    )
    return adapter + sum(n or 0 for n in saved)


def optimizer_bytes_per_param(optimizer: str) -> float:
    if optimizer in ("adamw_bnb_8bit", "paged_adamw_8bit"):
        return 2.0
    if optimizer == "adafactor":
        return 0.5
    return 8.0


def activation_bytes(
    shape: ModelShape, micro_batch: int, seq: int, checkpointing: bool, attention: str = "sdpa"
) -> float:
    s, b, h, a = seq, micro_batch, shape.hidden_size, shape.num_heads
    scores = 5 * a * s * s * b if attention == "eager" else 0  # the s x s attention matrices
    per_layer_full = s * b * h * 34 + scores
    if checkpointing:
        layers = shape.num_layers * 2 * s * b * h + per_layer_full
    else:
        layers = shape.num_layers * per_layer_full
    logits = b * s * shape.vocab_size * (2 + 4 + 4)
    return layers + logits


def estimate(m: MemoryInputs) -> dict[str, object]:
    """Per-GPU breakdown (GiB) and host RAM needs; a plain dict so it lands in plan.json."""
    shape = m.shape
    ws = max(m.world_size, 1)
    strategy = get_strategy(m.strategy)
    sharded_params, sharded_grads = strategy.shards_parameters, strategy.shards_gradients
    sharded_optim, deepspeed = strategy.shards_optimizer, strategy.deepspeed

    weights = weight_bytes(shape, m.method, m.dtype, m.double_quant, m.quant_bits)
    trainable = trainable_params(m)
    # adapters train in the plan's adapter dtype, and so do their gradients and AdamW moments
    trained_dtype = m.dtype if m.method == "full" else m.adapter_dtype
    adapter_bytes = trainable * DTYPE_BYTES[trained_dtype]
    if m.method != "full":
        weights += adapter_bytes
    if m.method == "full":
        grad_bytes = trainable * (4 if m.precision == "fp32" else 2)
    else:
        grad_bytes = trainable * DTYPE_BYTES[trained_dtype]
    optim = trainable * optimizer_bytes_per_param(m.optimizer)
    if not deepspeed and m.method != "full" and m.optimizer.startswith("adamw_torch"):
        optim = trainable * 2 * DTYPE_BYTES[trained_dtype]  # torch's AdamW: moments in param dtype
    if deepspeed and DTYPE_BYTES[trained_dtype] == 2:
        optim += trainable * 4  # fp32 master weights
    acts = activation_bytes(
        shape, m.micro_batch_size, m.seq_len, m.gradient_checkpointing, m.attention
    )

    gpu_weights = weights / ws if sharded_params else weights
    offload_params = m.offload_params and strategy.offloads_parameters
    if offload_params:
        gpu_weights = 0.0
    gpu_grads = grad_bytes / ws if sharded_grads else grad_bytes
    gpu_optim = optim / ws if sharded_optim else optim
    host_optim = 0.0
    if m.offload_optimizer and deepspeed:
        host_optim, gpu_optim = gpu_optim * m.gpus_per_node, 0.0
    if offload_params and strategy.fsdp:
        # FSDP2's CPU offload keeps each rank's shard of the parameters, their gradients and
        # the optimizer step on the host
        host_optim = (gpu_grads + gpu_optim) * m.gpus_per_node
        gpu_grads = gpu_optim = 0.0
    runtime = GIB if m.on_gpu else 0.0
    total = gpu_weights + gpu_grads + gpu_optim + acts + runtime

    # host RAM: each rank materialises its weights on the host before moving them to the device
    # (ZeRO-3 with zero.Init loads its shard), plus offloaded states; merge streams one shard
    load_per_rank = weights / ws if sharded_params else weights
    host_load = load_per_rank * m.gpus_per_node + host_optim
    if offload_params:
        host_load += weights / ws * m.gpus_per_node
    shard = min(m.merge_shard_gb * 1e9, shape.total_params() * 2)  # 16-bit shards
    merge_bytes = shard * 2 + adapter_bytes * 2  # one shard in and out, plus the adapter

    def gib(x: float) -> float:
        return round(x / GIB, 3)

    return {
        "per_gpu_gib": gib(total),
        "breakdown_gib": {
            "weights": gib(gpu_weights),
            "gradients": gib(gpu_grads),
            "optimizer": gib(gpu_optim),
            "activations": gib(acts),
            "runtime": gib(runtime),
        },
        "params": shape.total_params(),
        "trainable_params": trainable,
        "weight_bytes": int(weight_bytes(shape, m.method, m.dtype, m.double_quant, m.quant_bits)),
        "host_ram_load_gib_per_node": gib(host_load),
        "host_ram_merge_gib": gib(merge_bytes),
        "checkpoint_bytes": int(_checkpoint_bytes(m, trainable, optim)),
    }


def _checkpoint_bytes(m: MemoryInputs, trainable: int, optim: float) -> float:
    """Bytes one checkpoint writes: trainable weights (model dtype or fp32) + optimizer states."""
    weights = trainable * (4 if m.method != "full" else DTYPE_BYTES[m.dtype])
    return weights + optim + 1e6  # + tokenizer, trainer state, RNG files


def suggestions(m: MemoryInputs) -> list[str]:
    """What to change when the estimate does not fit, most effective first, each with the
    GiB per GPU it saves (the estimate redone with that one change)."""
    half_seq, half_batch = max(1, m.seq_len // 2), max(1, m.micro_batch_size // 2)
    options: list[tuple[str, MemoryInputs]] = []
    if not get_strategy(m.strategy).shards_parameters and m.world_size > 1:
        options.append(
            (
                "distributed.strategy=zero3 (shard weights, gradients and optimizer states)",
                replace(m, strategy="zero3"),
            )
        )
    if m.method == "full":
        options.append(("method.kind=qlora (4-bit base + adapters)", replace(m, method="qlora")))
    elif m.method == "lora":
        options.append(("method.kind=qlora (4-bit base)", replace(m, method="qlora")))
    if not m.gradient_checkpointing:
        options.append(
            ("train.gradient_checkpointing=true", replace(m, gradient_checkpointing=True))
        )
    if m.attention == "eager":
        options.append(
            (
                "model.attn_implementation=sdpa or flash_attention_2 (eager attention stores "
                "seq x seq scores)",
                replace(m, attention="sdpa"),
            )
        )
    if m.seq_len > 1:
        options.append(
            (
                f"a smaller data.max_seq_len ({m.seq_len} now; activations grow with it, "
                f"e.g. {half_seq})",
                replace(m, seq_len=half_seq),
            )
        )
    if m.micro_batch_size > 1:
        options.append(
            (
                "a smaller train.micro_batch_size (gradient accumulation keeps the global batch)",
                replace(m, micro_batch_size=half_batch),
            )
        )
    if get_strategy(m.strategy).offloads_optimizer and not m.offload_optimizer:
        options.append(("distributed.offload_optimizer=true", replace(m, offload_optimizer=True)))
    now = float(estimate(m)["per_gpu_gib"])  # type: ignore[arg-type]
    ranked = []
    for text, changed in options:
        saved = now - float(estimate(changed)["per_gpu_gib"])  # type: ignore[arg-type]
        if saved > 0.05:
            ranked.append((saved, f"{text}: saves {saved:.1f} GiB"))
    return [text for _, text in sorted(ranked, key=lambda r: -r[0])]
