"""The plain baseline for the merge-memory benchmark: what a user writes with peft.

The base loaded whole with transformers in bf16, the adapter attached with
PeftModel.from_pretrained, merge_and_unload(), then save_pretrained with the same maximum
shard size as the merge it is compared with.

    python tests/benchmarks/baseline_merge.py --base DIR --adapter DIR --out DIR \
        --max-shard-size 300MB
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-shard-size", required=True)
    args = parser.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
    merged.save_pretrained(args.out, max_shard_size=args.max_shard_size)


if __name__ == "__main__":
    main()
