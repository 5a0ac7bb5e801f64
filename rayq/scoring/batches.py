"""Calling a model on a calibration batch, and walking the tensors of its output."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from rayq.errors import ModelError

Batch = Any  # a tensor, a tuple of positional arguments, or a dict of keyword arguments


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def call_model(model: nn.Module, batch: Batch, index: int | None = None) -> Any:
    """Run the model on one batch; a batch the model cannot run is invalid input."""
    batch = to_device(batch, model_device(model))
    try:
        if isinstance(batch, dict):
            return model(**batch)
        if isinstance(batch, (tuple, list)):
            return model(*batch)
        return model(batch)
    except (TypeError, RuntimeError, ValueError, IndexError) as exc:
        where = f"calibration batch {index}" if index is not None else "a batch"
        raise ModelError(
            f"the model cannot run on {where} ({describe_batch(batch)}): {exc}. "
            "Check that the calibration data matches the model's forward arguments and shapes."
        ) from exc


def describe_batch(batch: Batch) -> str:
    if isinstance(batch, torch.Tensor):
        return f"tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, dict):
        parts = ", ".join(f"{k}={describe_batch(v)}" for k, v in batch.items())
        return "keyword arguments " + parts
    if isinstance(batch, (tuple, list)):
        return "positional arguments (" + ", ".join(describe_batch(v) for v in batch) + ")"
    return type(batch).__name__


def float_tensors(value: Any) -> Iterator[torch.Tensor]:
    """Yield every floating-point tensor in a nested output, in a fixed order."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield value
    elif isinstance(value, dict):
        for key in value:
            yield from float_tensors(value[key])
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from float_tensors(item)
    elif hasattr(value, "to_tuple"):  # transformers' ModelOutput
        yield from float_tensors(value.to_tuple())


def batch_size(batch: Batch) -> int:
    for tensor in _tensors(batch):
        return int(tensor.shape[0]) if tensor.dim() else 1
    return 1


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
