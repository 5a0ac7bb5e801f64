"""Row views of weight tensors: which axis is an output channel for each kind of layer.

Quantization works on a (rows, columns) matrix whose rows are the units that get their own
scales. `to_rows` builds that matrix from a weight and `from_rows` restores the weight's shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

LayoutKind = Literal["rows", "transposed", "conv_transpose"]


@dataclass(frozen=True)
class Layout:
    """How a weight maps to rows.

    - `rows`: dim 0 indexes rows (Linear, Conv, Embedding, LSTM/GRU gates, attention projections).
    - `transposed`: dim 1 indexes rows (the `Conv1D` of GPT-2 style models, weight (in, out)).
    - `conv_transpose`: ConvTranspose weights (in, out / groups, *kernel); output channel
      `g * out_per_group + j` gathers `weight[g * in_per_group:(g + 1) * in_per_group, j]`.
    """

    kind: LayoutKind = "rows"
    groups: int = 1

    def to_rows(self, weight: torch.Tensor) -> torch.Tensor:
        if self.kind == "transposed":
            return weight.t()
        if self.kind == "conv_transpose":
            in_channels, out_per_group = weight.shape[0], weight.shape[1]
            kernel = weight.shape[2:]
            grouped = weight.reshape(self.groups, in_channels // self.groups, out_per_group, *kernel)
            swapped = grouped.transpose(1, 2)
            return swapped.reshape(self.groups * out_per_group, -1)
        return weight.reshape(weight.shape[0], -1)

    def from_rows(self, rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if self.kind == "transposed":
            return rows.t().reshape(shape)
        if self.kind == "conv_transpose":
            in_channels, out_per_group = shape[0], shape[1]
            kernel = tuple(shape[2:])
            grouped = rows.reshape(self.groups, out_per_group, in_channels // self.groups, *kernel)
            return grouped.transpose(1, 2).reshape(shape)
        return rows.reshape(shape)

    def row_count(self, shape: torch.Size) -> int:
        if self.kind == "transposed":
            return shape[1]
        if self.kind == "conv_transpose":
            return shape[1] * self.groups
        return shape[0]
