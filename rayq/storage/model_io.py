"""The compressed model on disk: safetensors for every tensor, JSON for the quantization config.

Nothing is pickled. Loading rebuilds the quantized structure on a float instance of the same
architecture and then loads the tensors, so shared weights come back shared.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile

import safetensors.torch
import torch
from torch import nn

from rayq.errors import StorageError
from rayq.model.compressed import (INPUT_SCALE, INPUT_ZERO_POINT, QuantizedWeight,
                                   attach_input_quantizer, attach_weight, freeze)
from rayq.model.folding import mark_folded_structure
from rayq.quant.activations import ActivationParams
from rayq.quant.layout import Layout

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "quant_config.json"


def quant_config(model: nn.Module, folded: list[tuple[str, str]], source: dict | None) -> dict:
    """Describe every quantized weight and input quantizer of a compressed model."""
    tensor_ids: dict[int, int] = {}
    weights = []
    inputs = []
    # A module registered under two names is listed once; its alias shares the same object.
    for name, module in model.named_modules():
        for attribute, plist in getattr(module, "parametrizations", {}).items():
            quantized = plist[0]
            if not isinstance(quantized, QuantizedWeight):
                continue
            tensor_id = tensor_ids.setdefault(id(quantized), len(tensor_ids))
            weights.append({
                "module": name, "attribute": attribute, "tensor_id": tensor_id,
                "scheme": quantized.scheme, "shape": list(quantized.shape),
                "dtype": str(quantized.dtype).removeprefix("torch."),
                "layout": quantized.layout.kind, "groups": quantized.layout.groups,
                "rows": int(quantized.scales.shape[0]), "columns": quantized.columns,
            })
        if hasattr(module, INPUT_SCALE):
            inputs.append(name)
    return {"format_version": FORMAT_VERSION, "source": source, "folded": [list(p) for p in folded],
            "weights": weights, "input_quantizers": sorted(set(inputs))}


def save_model(model: nn.Module, folder: str, folded: list[tuple[str, str]],
               source: dict | None) -> None:
    """Write `model.safetensors` and `quant_config.json` into a local folder."""
    model = copy.deepcopy(model)
    freeze(model)
    config = quant_config(model, folded, source)
    os.makedirs(folder, exist_ok=True)
    # One metadata key only: safetensors (0.8.0) writes metadata keys in a random order, so two
    # keys would give the same model different bytes and sha256 from one save to the next. The
    # format version is in quant_config.json.
    safetensors.torch.save_model(model, os.path.join(folder, WEIGHTS_FILE),
                                 metadata={"format": "pt"})
    with open(os.path.join(folder, CONFIG_FILE), "w") as handle:
        json.dump(config, handle, indent=2)


def restore_structure(model: nn.Module, config: dict) -> nn.Module:
    """Give a float model the quantized structure that `config` describes, with empty tensors."""
    if config.get("format_version") != FORMAT_VERSION:
        raise StorageError(f"unsupported model format_version {config.get('format_version')!r}; "
                           f"this rayq reads version {FORMAT_VERSION}")
    mark_folded_structure(model, [tuple(p) for p in config["folded"]])
    made: dict[int, QuantizedWeight] = {}
    for entry in config["weights"]:
        owner = model.get_submodule(entry["module"])
        if entry["tensor_id"] not in made:
            made[entry["tensor_id"]] = _empty_weight(entry)
        attach_weight(owner, entry["attribute"], made[entry["tensor_id"]])
    for name in config["input_quantizers"]:
        attach_input_quantizer(model.get_submodule(name), ActivationParams(1.0, 0))
    return model


def _empty_weight(entry: dict) -> QuantizedWeight:
    dtype = getattr(torch, entry["dtype"])
    layout = Layout(entry["layout"], entry["groups"])
    rows, columns = entry["rows"], entry["columns"]
    from rayq.quant.schemes import SCHEMES

    groups = SCHEMES[entry["scheme"]].weights.scale_count(columns)
    return QuantizedWeight(entry["scheme"], layout, torch.Size(entry["shape"]), dtype,
                           torch.zeros(rows, columns, dtype=torch.int8),
                           torch.ones(rows, groups, dtype=torch.float32))


def load_model_files(weights: bytes | list[bytes], config: dict, model: nn.Module) -> nn.Module:
    """Load saved tensors into a copy of a float model of the same architecture.

    `weights` is one safetensors file, or the files of a model written block by block, which
    together hold every tensor.
    """
    model = copy.deepcopy(model).eval()
    restore_structure(model, config)
    missing: set[str] | None = None
    unexpected: set[str] = set()
    for data in [weights] if isinstance(weights, bytes) else weights:
        file_missing, file_unexpected = _load_file(model, data)
        missing = set(file_missing) if missing is None else missing & set(file_missing)
        unexpected |= set(file_unexpected)
    if missing or unexpected:
        raise StorageError("the saved model does not fit the given architecture: "
                           f"missing {sorted(missing or [])[:5]}, unexpected {sorted(unexpected)[:5]}")
    _check_input_buffers(model, config)
    return model


def _load_file(model: nn.Module, data: bytes) -> tuple[list[str], list[str]]:
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as handle:
        handle.write(data)
        handle.flush()
        try:
            return safetensors.torch.load_model(model, handle.name, strict=False)
        except (RuntimeError, ValueError) as exc:
            raise StorageError(f"the saved model does not fit the given architecture: {exc}") from None


def _check_input_buffers(model: nn.Module, config: dict) -> None:
    for name in config["input_quantizers"]:
        module = model.get_submodule(name)
        if float(getattr(module, INPUT_SCALE)) <= 0 or getattr(module, INPUT_ZERO_POINT) is None:
            raise StorageError(f"invalid input quantizer stored for layer {name!r}")
