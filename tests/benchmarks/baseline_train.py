"""The plain baseline for the training-overhead benchmark: transformers Trainer + peft LoRA,
started with plain `accelerate launch`, on the same model, data, batch and DeepSpeed JSON as
the tune-launch run it is compared with. It tokenizes like TRL's prompt/completion path (chat
template, loss on the completion only) and logs step times as tune-launch's metrics.jsonl does.

    accelerate launch --num_processes 2 --use_cpu [--use_deepspeed --deepspeed_config_file DS] \
        tests/benchmarks/baseline_train.py --model DIR --data FILE --out DIR --max-steps N ...

On a GPU (bench_gpu.py): --gpu --bf16 [--qlora] [--gradient-checkpointing] [--optim NAME],
the settings tune-launch takes from the recipe (NF4 double quant, prepare_model_for_kbit_training,
non-reentrant checkpointing).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--deepspeed")
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--micro-batch", type=int, required=True)
    p.add_argument("--grad-accum", type=int, required=True)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--logging-steps", type=int, default=1)
    # the GPU benchmark (bench_gpu.py): same switches as a tune-launch recipe
    p.add_argument("--gpu", action="store_true", help="CUDA + NCCL instead of CPU + gloo")
    p.add_argument("--bf16", action="store_true", help="bf16 weights and autocast")
    p.add_argument("--qlora", action="store_true", help="NF4 double-quant base, fp32 adapters")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--optim", default="adamw_torch")
    args = p.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    tok = AutoTokenizer.from_pretrained(args.model)
    with open(args.data) as fh:
        rows = [json.loads(line) for line in fh]

    def encode(row: dict[str, str]) -> dict[str, list[int]]:
        user = row["instruction"] + ("\n\n" + row["input"] if row.get("input") else "")
        prompt = [{"role": "user", "content": user}]
        full = [*prompt, {"role": "assistant", "content": row["output"]}]
        p_ids = tok.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        ids = tok.apply_chat_template(full, tokenize=True, return_dict=True)["input_ids"][
            : args.max_len
        ]
        labels = [-100] * min(len(p_ids), len(ids)) + ids[len(p_ids) :]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    data = Dataset.from_list([encode(r) for r in rows])
    set_seed(42)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    load: dict[str, object] = {"dtype": dtype}
    if args.qlora:
        from transformers import BitsAndBytesConfig

        load["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(args.model, **load)
    if args.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=args.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    model = get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )

    class StepTimes(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):  # type: ignore[no-untyped-def]
            if state.is_world_process_zero and logs and "loss" in logs:
                record = {"step": state.global_step, "loss": logs["loss"], "time": time.time()}
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                with open(f"{args.out}/metrics.jsonl", "a") as fh:
                    fh.write(json.dumps(record) + "\n")

    targs = TrainingArguments(
        output_dir=args.out,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        save_strategy="no",
        report_to=[],
        use_cpu=not args.gpu,
        ddp_backend="gloo" if not args.gpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        deepspeed=args.deepspeed,
        seed=42,
        data_seed=42,
        dataloader_num_workers=0,
        bf16=args.bf16,
        fp16=False,
        optim=args.optim,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}
        if args.gradient_checkpointing
        else None,
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=data,
        data_collator=DataCollatorForSeq2Seq(tok, padding=True),
        callbacks=[StepTimes()],
    )
    trainer.train()
    trainer.save_model(f"{args.out}/final")


if __name__ == "__main__":
    main()
