"""Peak host memory of the streaming merge stays well below the model's size.

A random Llama of ~280 MB (fp32) in 9 shards gets a LoRA adapter; the merge runs in a fresh
subprocess (verification off: it loads whole models by design) that samples its own RSS with
psutil every few ms and reads ru_maxrss, both relative to the RSS just before the merge.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from launcher.rundir import RunDir

from .conftest import save_multishard, write_plan

PROBE = r"""
import json, resource, sys, threading, time
from pathlib import Path
import psutil, torch, safetensors.torch  # imports are not the merge's memory
from launcher.merge.run import merge_run

proc = psutil.Process()
before = proc.memory_info().rss
maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
peak, done = before, False

def sample():
    global peak
    while not done:
        peak = max(peak, proc.memory_info().rss)
        time.sleep(0.002)

thread = threading.Thread(target=sample, daemon=True)
thread.start()
start = time.monotonic()
merge_run(Path(sys.argv[1]), verify_merge=False)
seconds = time.monotonic() - start
done = True
thread.join()
maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({
    "rss_before": before,
    "sampled_peak_delta": peak - before,
    # ru_maxrss only says something about the merge if the merge raised it
    "maxrss_delta": maxrss_after - before if maxrss_after > maxrss_before else None,
    "seconds": seconds,
}))
"""


def build_model(base: Path) -> Any:
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=8192,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    save_multishard(model, base, "32MB")
    return model


def test_streaming_merge_peak_rss_is_far_below_model_size(tmp_path: Path) -> None:
    import peft
    import torch

    base = tmp_path / "base"
    model = build_model(base)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert len(list(base.glob("model-*.safetensors"))) >= 8
    run = tmp_path / "run"
    write_plan(run, str(base), merge={"shard_size_gb": 0.032})
    pm = peft.get_peft_model(
        model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    )
    with torch.no_grad():
        for name, param in pm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    pm.save_pretrained(RunDir(run).final)
    del model, pm

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(run)],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    index = json.loads((RunDir(run).merged / "model.safetensors.index.json").read_text())
    out_shards = len(set(index["weight_map"].values()))
    peak = max(stats["sampled_peak_delta"], stats["maxrss_delta"] or 0)
    mib = 2**20
    print(
        f"model {model_bytes / mib:.0f} MiB in {len(list(base.glob('model-*')))} shards -> "
        f"{out_shards} shards; merge peak RSS +{peak / mib:.0f} MiB "
        f"(sampled +{stats['sampled_peak_delta'] / mib:.0f}, ru_maxrss "
        f"{'+%.0f MiB' % (stats['maxrss_delta'] / mib) if stats['maxrss_delta'] else 'not raised'}) "
        f"in {stats['seconds']:.1f} s"
    )
    assert out_shards >= 8
    assert index["metadata"]["total_size"] == model_bytes
    # one base shard mapped + one tensor in fp32 and its output: far below the whole model
    assert peak < model_bytes / 2, stats
