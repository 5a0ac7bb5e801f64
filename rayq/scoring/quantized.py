"""Quantized copies of each layer's weights for every candidate scheme, kept as integer codes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rayq.model.layers import LayerSpec, weight_of
from rayq.quant.layout import Layout
from rayq.quant.schemes import Scheme
from rayq.quant.weights import WeightFormat, choose_scales, dequantize_rows, quantize_rows


@dataclass
class QuantizedTensor:
    """Integer codes and float32 scales of one weight under one weight format."""

    codes: torch.Tensor
    scales: torch.Tensor
    fmt: WeightFormat
    layout: Layout
    shape: torch.Size
    dtype: torch.dtype

    def dequantize(self) -> torch.Tensor:
        rows = dequantize_rows(self.codes, self.scales, self.fmt)
        return self.layout.from_rows(rows, self.shape).to(self.dtype)


def quantize_weight(weight: torch.Tensor, layout: Layout, fmt: WeightFormat,
                    search: bool = True) -> QuantizedTensor:
    rows = layout.to_rows(weight.detach())
    scales = choose_scales(rows, fmt, search=search)
    codes = quantize_rows(rows, scales, fmt)
    return QuantizedTensor(codes, scales, fmt, layout, weight.shape, weight.dtype)


class WeightBank:
    """Quantized weights per (layer, scheme), computed once and dequantized on each use.

    Codes take a quarter of the float32 weight, so holding them for every scheme costs far less
    than holding dequantized copies.
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
