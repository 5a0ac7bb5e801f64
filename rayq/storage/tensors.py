"""Index a safetensors checkpoint and read chosen tensors of it, leaving the rest on disk.

A safetensors file is an 8-byte little-endian header length, a JSON header with each tensor's
dtype, shape and byte range, then the data. Tensors are read with plain file reads into new
tensors in anonymous memory, so a worker's resident memory grows by the tensors it reads and
drops when it frees them. `safetensors.safe_open` (0.8.0) would return tensors backed by a
mapping of the file instead, whose pages stay resident for as long as any tensor of that mapping
lives.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch

from rayq.errors import ModelError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checkpoint: its file, dtype, shape and absolute byte range."""

    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def checkpoint_files(folder: str) -> list[str]:
    """Return the safetensors files of a Hugging Face model folder (one file or a sharded index)."""
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as handle:
            weight_map = json.load(handle).get("weight_map", {})
        return [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
    raise ModelError(f"model folder {folder!r} has neither {SINGLE_FILE} nor {INDEX_FILE}; "
                     "block-by-block loading reads safetensors checkpoints only")


def read_header(path: str) -> dict[str, TensorEntry]:
    """Index every tensor of one safetensors file by name."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ModelError(f"tensor {name!r} in {path!r} has dtype {info['dtype']}, which "
                             f"rayq does not read; supported: {', '.join(_DTYPES)}")
        start, end = info["data_offsets"]
        entries[name] = TensorEntry(path, _DTYPES[info["dtype"]], tuple(info["shape"]),
                                    8 + length + start, 8 + length + end)
    return entries


def checkpoint_index(folder: str) -> dict[str, TensorEntry]:
    """Index every tensor of a model folder's checkpoint by name, reading headers only."""
    entries: dict[str, TensorEntry] = {}
    for path in checkpoint_files(folder):
        entries.update(read_header(path))
    return entries


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    """Read one tensor's byte range into a new CPU tensor."""
    data = torch.empty(entry.nbytes, dtype=torch.uint8)
    view = memoryview(data.numpy())
    with open(entry.path, "rb", buffering=0) as handle:
        handle.seek(entry.start)
        filled = 0
        while filled < entry.nbytes:
            count = handle.readinto(view[filled:])
            if not count:
                raise ModelError(f"{entry.path!r} ends inside tensor data at byte "
                                 f"{entry.start + filled}; the checkpoint is truncated")
            filled += count
    # safetensors stores little-endian data, the byte order of the CPUs torch runs on.
    return data.view(entry.dtype).reshape(entry.shape)


def read_tensors(entries: dict[str, TensorEntry], names: list[str]) -> dict[str, torch.Tensor]:
    return {name: read_tensor(entries[name]) for name in names}
