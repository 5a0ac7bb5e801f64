"""End-to-end sensitivity: quantize one layer at a time and measure the whole model's output.

    QS_e2e(l, s) = sum over batches ||F^{l,s}(x) - F(x)||^2 / sum over batches ||F(x)||^2

where F is the float model and F^{l,s} the same model with only layer l quantized with scheme s.
It catches errors that grow downstream, which the one-pass local QS cannot see, at the cost of
one model pass per layer, scheme and batch. Sums are kept per batch in float64 like the local
ones, so any split of the work over workers reduces to the same bits.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn
from torch.func import functional_call

from rayq.model.layers import LayerSpec
from rayq.quant.activations import ActivationParams, fake_quantize_activation
from rayq.quant.schemes import Scheme
from rayq.scoring.batches import Batch, call_model, float_tensors, model_device, to_device
from rayq.scoring.quantized import WeightBank
from rayq.scoring.sensitivity import BatchSums, LayerSums, _squared_error, _squared_norm


@contextmanager
def _quantized_input(module: nn.Module, params: ActivationParams | None) -> Iterator[None]:
    if params is None:
        yield
        return

    def quantize(_module, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            return (fake_quantize_activation(args[0], params), *args[1:])
        return None

    handle = module.register_forward_pre_hook(quantize)
    try:
        yield
    finally:
        handle.remove()


def _call_with(model: nn.Module, weights: dict[str, torch.Tensor], batch: Batch):
    batch = to_device(batch, model_device(model))
    if isinstance(batch, dict):
        return functional_call(model, weights, (), batch)
    if isinstance(batch, (tuple, list)):
        return functional_call(model, weights, tuple(batch))
    return functional_call(model, weights, (batch,))


def score_end_to_end(model: nn.Module, layers: list[LayerSpec], schemes: list[Scheme],
                     bank: WeightBank, activations: dict[str, ActivationParams],
                     batches: Iterable[tuple[int, Batch]]) -> BatchSums:
    """Return per-batch end-to-end QS sums of the given layers, keyed like the local sums."""
    partials: BatchSums = {}
    with torch.no_grad():
        for index, batch in batches:
            reference = [t.detach() for t in float_tensors(call_model(model, batch, index))]
            signal = _squared_norm(reference)
            per_layer = {}
            for layer in layers:
                sums = LayerSums(end_to_end_denominator=signal)
                for scheme in schemes:
                    if scheme.name in layer.unfit:
                        continue
                    sums.end_to_end[scheme.name] = _layer_error(model, layer, scheme, bank,
                                                                activations, batch, reference)
                per_layer[layer.name] = sums
            partials[index] = per_layer
    return partials


def _layer_error(model, layer, scheme, bank, activations, batch, reference) -> float:
    params = activations.get(layer.name) if scheme.quantize_input else None
    if scheme.quantize_input and params is None:
        return math.nan
    prefix = f"{layer.name}." if layer.name else ""
    weights = {prefix + path: w for path, w in bank.dequantized(layer.name, scheme.name).items()}
    with _quantized_input(model.get_submodule(layer.name), params):
        output = _call_with(model, weights, batch)
    return _squared_error(list(float_tensors(output)), reference)
