"""Streaming safetensors I/O: read a checkpoint one tensor at a time, write shards planned ahead.

A merge must not hold the model in memory. Reading is positioned reads of one tensor's bytes
(no memory map: the pages of a mapped shard would count in the process's resident set until
it is unmapped). Writing plans every output shard from the tensors' names, shapes and dtypes
before any data is read, so each file's header is written first and each tensor is appended
as soon as it is computed: the writer holds no tensor, and peak memory does not grow with the
shard size. A tensor that is written unchanged is copied file to file in COPY_CHUNK pieces
(`ShardWriter.copy`), never becoming a tensor: an untouched 1 GB embedding costs 16 MiB.

The file format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian
header length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {...}}
padded with spaces to a multiple of 8, then the tensors' bytes back to back.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from launcher.errors import RunError

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

TORCH_TO_ST: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
ST_TO_TORCH = {name: dtype for dtype, name in TORCH_TO_ST.items()}
ST_SIZE = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in ST_TO_TORCH.items()}
ST_FLOAT = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
COPY_CHUNK = 16 * 2**20  # bytes per read when a tensor is copied file to file


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as a safetensors header describes it."""

    name: str
    dtype: str  # safetensors dtype name: F32, BF16, ...
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ST_SIZE[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> dict[str, TensorSpec]:
    """The tensors a safetensors file holds, from its header alone (no data read, no mmap)."""
    return {name: stored.spec for name, stored in _layout(path).items()}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes are: `read()` makes it a tensor, ShardWriter.copy copies them."""

    path: Path
    spec: TensorSpec
    offset: int  # of the first byte, from the start of the file

    def read(self) -> torch.Tensor:
        """The tensor, in a buffer of its own (a positioned read; the file is not mapped)."""
        dtype = ST_TO_TORCH[self.spec.dtype]
        if self.spec.nbytes == 0:
            return torch.empty(self.spec.shape, dtype=dtype)
        data = bytearray(self.spec.nbytes)
        with self.path.open("rb", buffering=0) as fh:
            fh.seek(self.offset)
            view, done = memoryview(data), 0
            while done < len(data):
                n = fh.readinto(view[done:])
                if not n:
                    raise RunError(f"{self.path} ends inside tensor {self.spec.name}")
                done += n
        flat = torch.frombuffer(data, dtype=torch.uint8)
        return flat.view(dtype).reshape(self.spec.shape)


def _layout(path: Path) -> dict[str, StoredTensor]:
    """Every tensor of a safetensors file with the offset of its bytes, from the header."""
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    start, size = 8 + length, path.stat().st_size
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in ST_SIZE:
            raise RunError(f"{path}: tensor {name} has dtype {info['dtype']}, not supported here")
        spec = TensorSpec(name, info["dtype"], tuple(info["shape"]))
        begin, end = info["data_offsets"]
        if end - begin != spec.nbytes or start + end > size:
            raise RunError(
                f"{path}: tensor {name} ({spec.dtype} {spec.shape}) does not fit its "
                f"data_offsets [{begin}, {end}] in a {size}-byte file; the file is damaged"
            )
        out[name] = StoredTensor(path, spec, start + begin)
    return out


@dataclass(frozen=True)
class Checkpoint:
    """A model directory's safetensors weights: one model.safetensors, or shards + index."""

    root: Path
    weight_map: dict[str, str]  # tensor name -> shard file name, relative to root

    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def specs(self) -> dict[str, TensorSpec]:
        """Every tensor's spec, in reading order (file by file, header order within a file)."""
        out: dict[str, TensorSpec] = {}
        for file in self.files:
            for name, spec in read_header(self.root / file).items():
                if self.weight_map.get(name) == file:
                    out[name] = spec
        missing = set(self.weight_map) - set(out)
        if missing:
            raise RunError(
                f"{self.root / INDEX_NAME} lists tensors that are not in their shard: "
                f"{', '.join(sorted(missing)[:5])}; the base checkpoint is incomplete"
            )
        return out

    def file_sizes(self) -> list[tuple[str, int]]:
        """(name, size) of the index and every shard: the checkpoint's cheap fingerprint."""
        names = [INDEX_NAME] if (self.root / INDEX_NAME).is_file() else []
        return [(n, (self.root / n).stat().st_size) for n in names + self.files]

    def iter_stored(self) -> Iterator[StoredTensor]:
        """Every tensor's location, in `specs()` order; nothing is read yet."""
        for file in self.files:
            for name, stored in _layout(self.root / file).items():
                if self.weight_map.get(name) == file:
                    yield stored

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) one at a time, in `specs()` order."""
        for stored in self.iter_stored():
            yield stored.spec.name, stored.read()


def open_checkpoint(root: Path) -> Checkpoint:
    """The safetensors checkpoint in `root`; RunError when there is none."""
    index = root / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return Checkpoint(root, dict(weight_map))
    single = root / SINGLE_NAME
    if single.is_file():
        return Checkpoint(root, dict.fromkeys(read_header(single), SINGLE_NAME))
    found = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    raise RunError(
        f"no safetensors weights in {root} (neither {SINGLE_NAME} nor {INDEX_NAME}; found: "
        f"{', '.join(found[:10]) or 'nothing'}). Re-save the model with "
        "save_pretrained(..., safe_serialization=True)"
    )


def plan_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Greedy, order-keeping packing; a tensor larger than max_bytes gets a shard of its own."""
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    size = 0
    for spec in specs:
        if current and size + spec.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += spec.nbytes
    if current:
        shards.append(current)
    return shards


def _header_bytes(specs: list[TensorSpec]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Writes tensors into shards planned up front: call `write(name, tensor)` in plan order.

    Each shard is written as `<name>.tmp` and renamed when its last tensor is in; `close()`
    writes model.safetensors.index.json and returns it.
    """

    def __init__(self, out_dir: Path, specs: list[TensorSpec], max_bytes: int) -> None:
        self.out_dir = out_dir
        self.shards = plan_shards(specs, max_bytes)
        total = len(self.shards)
        self.names = [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
        self._order = [(i, spec) for i, shard in enumerate(self.shards) for spec in shard]
        self._next = 0
        self._shard = -1
        self._fh: IO[bytes] | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append a tensor: the next one in the plan, with the planned dtype and shape."""
        fh = self._next_file(name, TORCH_TO_ST.get(tensor.dtype), tuple(tensor.shape))
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        fh.write(data.data)

    def copy(self, stored: StoredTensor) -> None:
        """Append a stored tensor's bytes unchanged, COPY_CHUNK at a time (no tensor made)."""
        spec = stored.spec
        fh = self._next_file(spec.name, spec.dtype, spec.shape)
        buffer = memoryview(bytearray(min(COPY_CHUNK, spec.nbytes)))
        with stored.path.open("rb", buffering=0) as src:
            offset, end = stored.offset, stored.offset + spec.nbytes
            while offset < end:
                n = os.preadv(src.fileno(), [buffer[: end - offset]], offset)
                if not n:
                    raise RunError(f"{stored.path} ends inside tensor {spec.name}")
                fh.write(buffer[:n])
                offset += n

    def _next_file(self, name: str, dtype: str | None, shape: tuple[int, ...]) -> IO[bytes]:
        """Check the tensor against the plan, open its shard when it starts one, advance."""
        if self._next >= len(self._order):
            raise RunError(f"merge wrote more tensors than planned (extra: {name})")
        shard, spec = self._order[self._next]
        if name != spec.name or dtype != spec.dtype or shape != spec.shape:
            raise RunError(
                f"merge produced {name} {dtype} {shape} where the shard plan "
                f"expects {spec.name} {spec.dtype} {spec.shape}"
            )
        if shard != self._shard:
            self._finish_shard()
            self._shard = shard
            self._fh = (self.out_dir / f"{self.names[shard]}.tmp").open("wb")
            self._fh.write(_header_bytes(self.shards[shard]))
        assert self._fh is not None
        self._next += 1
        return self._fh

    def _finish_shard(self) -> None:
        if self._fh is None:
            return
        self._fh.close()
        self._fh = None
        name = self.names[self._shard]
        (self.out_dir / f"{name}.tmp").replace(self.out_dir / name)
        size = sum(s.nbytes for s in self.shards[self._shard])
        log.info(
            "wrote shard %d/%d %s (%d tensors, %.1f MB)",
            self._shard + 1,
            len(self.shards),
            name,
            len(self.shards[self._shard]),
            size / 1e6,
        )

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def close(self) -> dict[str, Any]:
        if self._next != len(self._order):
            missing = [spec.name for _, spec in self._order[self._next : self._next + 5]]
            raise RunError(f"merge stopped before writing {', '.join(missing)}")
        self._finish_shard()
        index = {
            "metadata": {"total_size": sum(spec.nbytes for _, spec in self._order)},
            "weight_map": {
                spec.name: self.names[shard] for shard, spec in sorted(self._order, key=_by_name)
            },
        }
        path = self.out_dir / INDEX_NAME
        path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return index


def _by_name(item: tuple[int, TensorSpec]) -> str:
    return item[1].name
