"""The INT4 quantizer: llm-compressor's GPTQ, W4A16, saved as compressed-tensors.

Run as `python -m launcher.export.int4_quantize MODEL_DIR OUT_DIR CALIBRATION.jsonl MAX_LEN`
with llm-compressor's own pins first on PYTHONPATH (launcher/export/int4.py): llm-compressor
0.14 wants transformers 5.17 and compressed-tensors 0.19, the main environment holds vLLM's
transformers 5.19 and compressed-tensors 0.17. It imports nothing else of tune-launch.

Every Linear layer but lm_head becomes 4-bit, symmetric, one scale per group of input columns
(128, or the largest of 64/32 dividing every layer's input size: vLLM's CPU W4A16 kernel wants
an even group size and sizes that are multiples of 32). GPTQ calibrates on the texts given
(the run's own training rows, rendered as trained).
"""

from __future__ import annotations

import json
import sys
import time


def group_size(model: object) -> int:
    import torch

    sizes = {
        m.in_features
        for name, m in model.named_modules()  # type: ignore[attr-defined]
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")
    }
    for g in (128, 64, 32):
        if all(s % g == 0 for s in sizes):
            return g
    raise SystemExit(f"no group size of 128/64/32 divides every Linear input size {sorted(sizes)}")


def main(model_dir: str, out_dir: str, calibration: str, max_len: int) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    with open(calibration, encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for line in fh]
    enc = [tok(t, add_special_tokens=False, truncation=True, max_length=max_len) for t in texts]
    data = Dataset.from_dict(
        {
            "input_ids": [e["input_ids"] for e in enc],
            "attention_mask": [e["attention_mask"] for e in enc],
        }
    )
    g = group_size(model)
    scheme = {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 4,
                "type": "int",
                "symmetric": True,
                "strategy": "group",
                "group_size": g,
            },
        }
    }
    recipe = GPTQModifier(config_groups=scheme, ignore=["lm_head"])
    started = time.monotonic()
    oneshot(
        model=model,
        dataset=data,
        recipe=recipe,
        max_seq_length=max_len,
        num_calibration_samples=len(texts),
    )
    seconds = time.monotonic() - started
    model.save_pretrained(out_dir, save_compressed=True)
    tok.save_pretrained(out_dir)
    print(
        json.dumps(
            {"group_size": g, "calibration_rows": len(texts), "gptq_seconds": round(seconds, 1)}
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
