"""The streaming shard writer writes files the safetensors library reads back exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launcher.errors import RunError
from launcher.merge.safetensors_stream import (
    TORCH_TO_ST,
    ShardWriter,
    TensorSpec,
    open_checkpoint,
    plan_shards,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 33, generator=g),
        "b.weight": torch.randn(17, 5, generator=g).to(torch.bfloat16),
        "c.half": torch.randn(3, 7, generator=g).to(torch.float16),
        "d.ids": torch.arange(10, dtype=torch.int64),
        "e.mask": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(2.5),
        "g.big": torch.randn(300, 100, generator=g),  # larger than a shard: a shard of its own
        "h.empty": torch.zeros(0, 4),
    }


def test_written_shards_read_back_exactly(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    tensors = _tensors()
    specs = [TensorSpec(n, TORCH_TO_ST[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardWriter(tmp_path, specs, max_bytes=10_000)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    index = writer.close()

    files = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(files) == len(writer.shards) >= 3
    assert not list(tmp_path.glob("*.tmp"))
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs)
    assert json.loads((tmp_path / "model.safetensors.index.json").read_text()) == index
    back: dict[str, torch.Tensor] = {}
    for file in files:
        back.update(load_file(str(file)))
    assert set(back) == set(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    # and our own reader sees the same, one tensor at a time
    checkpoint = open_checkpoint(tmp_path)
    assert {n: s for n, s in checkpoint.specs().items()} == {s.name: s for s in specs}
    assert {n: t.shape for n, t in checkpoint.iter_tensors()} == {
        n: t.shape for n, t in tensors.items()
    }


def test_plan_keeps_order_and_bounds() -> None:
    specs = [TensorSpec(f"t{i}", "F32", (n,)) for i, n in enumerate([10, 10, 30, 5, 5, 5])]
    shards = plan_shards(specs, max_bytes=80)
    assert [[s.name for s in shard] for shard in shards] == [
        ["t0", "t1"],
        ["t2"],
        ["t3", "t4", "t5"],
    ]


def test_writer_refuses_out_of_plan_tensors(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, [TensorSpec("a", "F32", (2,))], max_bytes=100)
    with pytest.raises(RunError, match="shard plan expects a F32"):
        writer.write("a", torch.zeros(3))
    with pytest.raises(RunError, match="stopped before writing a"):
        writer.close()


def test_no_safetensors_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(RunError, match=r"no safetensors weights.*pytorch_model\.bin"):
        open_checkpoint(tmp_path)
