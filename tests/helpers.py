"""Small helpers shared by the engine tests."""

from __future__ import annotations

import torch
from torch import nn

from rayq.model.compressed import QuantizedWeight


def randn_batches(count: int, *shape, seed: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator).to(dtype) for _ in range(count)]


def plan_rows(result) -> dict[str, dict]:
    return {row["layer"]: row for row in result.plan.to_pylist()}


def sensitivity_rows(result) -> dict[tuple[str, str], dict]:
    return {(row["layer"], row["scheme"]): row for row in result.sensitivity.to_pylist()}


def quantizer(model: nn.Module, module_name: str, attribute: str = "weight") -> QuantizedWeight:
    return model.get_submodule(module_name).parametrizations[attribute][0]
