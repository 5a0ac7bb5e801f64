"""Quantized copies of each layer's weights for every candidate scheme, kept as integer codes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rayq.model.layers import LayerSpec, weight_of
from rayq.quant.layout import Layout
from rayq.quant.schemes import Scheme
from rayq.quant.weights import (
    WeightFormat,
    choose_scales,
    dequantize_rows,
    pack_int4,
    quantize_rows,
    unpack_int4,
)


@dataclass
class QuantizedTensor:
    """Integer codes and float32 scales of one weight under one weight format.

    4-bit codes are kept packed two per byte, as the compressed module stores them, so a bank
    of int4 and int8 candidates takes 1.5 bytes per weight element instead of 2.
    """

    stored: torch.Tensor
    scales: torch.Tensor
    fmt: WeightFormat
    layout: Layout
    shape: torch.Size
    dtype: torch.dtype
    columns: int

    @property
    def codes(self) -> torch.Tensor:
        """The int8 codes as a (rows, columns) matrix, unpacked where they are 4-bit."""
        return self._unpacked(self.stored)

    def dequantize(self) -> torch.Tensor:
        rows = dequantize_rows(self.codes, self.scales, self.fmt)
        return self.layout.from_rows(rows, self.shape).to(self.dtype)

    def dequantize_rows_at(self, index: torch.Tensor) -> torch.Tensor:
        """Dequantize only the rows at `index` (a 1-D tensor), as (len(index), columns).

        Each row has its own scales, so the result equals the same rows of the whole dequantized
        matrix bit for bit, at the cost of the rows looked up rather than of the whole table.
        """
        codes = self._unpacked(self.stored[index])
        return dequantize_rows(codes, self.scales[index], self.fmt).to(self.dtype)

    def _unpacked(self, stored: torch.Tensor) -> torch.Tensor:
        return unpack_int4(stored, self.columns) if self.fmt.bits == 4 else stored


def quantize_weight(weight: torch.Tensor, layout: Layout, fmt: WeightFormat,
                    search: bool = True) -> QuantizedTensor:
    rows = layout.to_rows(weight.detach())
    scales = choose_scales(rows, fmt, search=search)
    codes = quantize_rows(rows, scales, fmt)
    stored = pack_int4(codes) if fmt.bits == 4 else codes
    return QuantizedTensor(stored, scales, fmt, layout, weight.shape, weight.dtype, codes.shape[1])


class WeightBank:
    """Quantized weights per (layer, scheme), computed once and dequantized on each use.

    Codes take a quarter (int8) or an eighth (int4) of the float32 weight, so holding them for
    every scheme costs far less than holding dequantized copies.
    """

    def __init__(self, model: nn.Module, layers: list[LayerSpec], schemes: list[Scheme],
                 clip_search: bool = True):
        self._entries: dict[tuple[str, str], dict[str, QuantizedTensor]] = {}
        for layer in layers:
            for scheme in schemes:
                if scheme.name in layer.unfit:
                    continue
                self._entries[(layer.name, scheme.name)] = {
                    ref.path: quantize_weight(weight_of(model, layer, ref), ref.layout,
                                              scheme.weights, clip_search)
                    for ref in layer.weights
                }

    def get(self, layer: str, scheme: str) -> dict[str, QuantizedTensor]:
        return self._entries[(layer, scheme)]

    def dequantized(self, layer: str, scheme: str) -> dict[str, torch.Tensor]:
        return {path: q.dequantize() for path, q in self._entries[(layer, scheme)].items()}
