"""method=full: a real DeepSpeed ZeRO-3 checkpoint consolidated by merge_run (slow tier)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from launcher.merge.run import merge_run
from launcher.rundir import RunDir

from .conftest import write_plan
from .test_merge import load_dir

ZERO3_STEP = r"""
import os, sys, torch, deepspeed, transformers
from safetensors.torch import save_file
base, ckpt, ref = sys.argv[1:4]
deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
config = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3},
    "zero_allow_untested_optimizer": True,
}
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
ids = torch.randint(0, 1000, (1, 16))
loss = engine(input_ids=ids, labels=ids).loss
engine.backward(loss)
engine.step()
engine.save_checkpoint(ckpt)
params = list(engine.module.parameters())
with deepspeed.zero.GatheredParameters(params):
    state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
save_file(state, ref)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.train
def test_zero3_checkpoint_is_consolidated(bases: Any, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    base = bases("llama")
    run = tmp_path / "run"
    write_plan(run, str(base), method={"kind": "full"}, merge={"shard_size_gb": 0.0003})
    ckpt = RunDir(run).checkpoint(1)
    ref = tmp_path / "trained.safetensors"
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "DS_ACCELERATOR": "cpu",
        "CUDA_VISIBLE_DEVICES": "",
        "TORCH_EXTENSIONS_DIR": str(root / ".cache" / "torch_extensions"),
    }
    result = subprocess.run(
        [sys.executable, "-c", ZERO3_STEP, str(base), str(ckpt), str(ref)],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    RunDir.mark_complete(ckpt, {"step": 1})
    for name in ("config.json", "generation_config.json"):
        shutil.copy(base / name, ckpt / name)
    final = RunDir(run).final  # what a ZeRO-3 run without gathered 16-bit weights leaves
    final.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(base / name, final / name)

    out = merge_run(run)

    assert out == RunDir(run).merged
    merged = load_dir(out)
    trained = load_file(str(ref))
    assert set(merged) == set(trained)
    for name, tensor in trained.items():
        assert torch.equal(merged[name], tensor), name
    assert not torch.equal(trained["lm_head.weight"], load_dir(base)["lm_head.weight"])
    assert len(list(out.glob("model-*.safetensors"))) >= 2
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert merge_run(run) == out  # idempotent
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
