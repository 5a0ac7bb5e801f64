"""Index a safetensors checkpoint and read chosen tensors of it, leaving the rest on disk.

`safetensors.safe_open` (0.8.0) maps the file and returns tensors backed by the mapping, so a
process's resident memory grows by the pages of the tensors it reads and touches, not by the
file's size.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open

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
    """One tensor of a checkpoint: its file, dtype and shape."""

    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


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


def checkpoint_index(folder: str) -> dict[str, TensorEntry]:
    """Index every tensor of a model folder's checkpoint by name, reading headers only."""
    entries: dict[str, TensorEntry] = {}
    for path in checkpoint_files(folder):
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                view = handle.get_slice(name)
                dtype = view.get_dtype()
                if dtype not in _DTYPES:
                    raise ModelError(f"tensor {name!r} in {path!r} has dtype {dtype}, which rayq "
                                     f"does not read; supported: {', '.join(_DTYPES)}")
                entries[name] = TensorEntry(path, _DTYPES[dtype], tuple(view.get_shape()))
    return entries


def read_tensors(entries: dict[str, TensorEntry], names: list[str]) -> dict[str, torch.Tensor]:
    """Read the named tensors, opening each file once."""
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(entries[name].path, []).append(name)
    tensors = {}
    for path, keys in by_file.items():
        with safe_open(path, framework="pt") as handle:
            for name in keys:
                tensors[name] = handle.get_tensor(name)
    return tensors
