"""One-pass quantization sensitivity: QS sums of every layer and scheme from one float pass.

For each call of a quantizable layer, a forward hook receives the input the layer got in the float
model and its float output, reruns the layer with quantized weights (and, for `w8a8`, a quantized
input) and adds the squared error and the squared float output to float64 sums. No input is kept
after its call, so memory stays near that of a float forward pass plus one layer's outputs.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch.func import functional_call

from rayq.model.layers import LayerSpec
from rayq.quant.activations import ActivationParams, Histogram, fake_quantize_activation
from rayq.quant.schemes import Scheme
from rayq.scoring.batches import Batch, call_model, float_tensors
from rayq.scoring.quantized import WeightBank

logger = logging.getLogger(__name__)


@dataclass
class LayerSums:
    """QS sums of one layer over one batch (or, after reduction, over all batches)."""

    # Calls with at least one output element. Calls on empty tensors carry no data.
    calls: int = 0
    denominator: float = 0.0
    numerators: dict[str, float] = field(default_factory=dict)
    nonfinite_inputs: int = 0
    nonfinite_outputs: int = 0
    # End-to-end sums (see rayq.scoring.end_to_end): whole-model output error per scheme.
    end_to_end: dict[str, float] = field(default_factory=dict)
    end_to_end_denominator: float = 0.0

    def add(self, other: "LayerSums") -> None:
        self.calls += other.calls
        self.denominator += other.denominator
        for scheme, value in other.numerators.items():
            self.numerators[scheme] = self.numerators.get(scheme, 0.0) + value
        self.nonfinite_inputs += other.nonfinite_inputs
        self.nonfinite_outputs += other.nonfinite_outputs
        for scheme, value in other.end_to_end.items():
            self.end_to_end[scheme] = self.end_to_end.get(scheme, 0.0) + value
        self.end_to_end_denominator += other.end_to_end_denominator


# Partial sums keyed by global batch index, then by layer name.
BatchSums = dict[int, dict[str, LayerSums]]


def reduce_sums(partials: BatchSums, layers: list[LayerSpec]) -> dict[str, LayerSums]:
    """Add per-batch sums in global batch order, so any split of the batches gives equal bits."""
    totals = {layer.name: LayerSums() for layer in layers}
    for index in sorted(partials):
        for name, sums in partials[index].items():
            totals[name].add(sums)
    return totals


def merge_partials(*parts: BatchSums) -> BatchSums:
    """Combine per-batch sums of different passes (local and end-to-end) of the same batches."""
    merged: BatchSums = {}
    for part in parts:
        for index, layers in part.items():
            target = merged.setdefault(index, {})
            for name, sums in layers.items():
                if name in target:
                    target[name].add(sums)
                else:
                    target[name] = LayerSums()
                    target[name].add(sums)
    return merged


def qs_value(numerator: float, denominator: float) -> float:
    """QS from its sums, with defined values where the ratio is degenerate.

    Equal outputs give exactly 0.0 (also over a zero signal), a nonzero error over a zero signal
    gives +inf, and a NaN numerator stays NaN so that it never passes a threshold test.
    """
    if math.isnan(numerator) or math.isnan(denominator):
        return math.nan
    if numerator == 0.0:
        return 0.0
    if denominator == 0.0:
        return math.inf
    return numerator / denominator


# Elements per float32 partial sum in _energy.
ENERGY_CHUNK = 256


def _energy(tensor: torch.Tensor) -> float:
    """Sum of squares, from float32 dot products of short chunks added in float64.

    Widening a whole output to float64 costs more than the layer's own recomputation on wide
    layers. Chunks of 256 keep each float32 partial sum's relative error near 1e-7 (tests allow
    1e-6), and the result depends only on the tensor, so any split of the batches gives equal bits.
    """
    flat = tensor.detach().reshape(-1)
    if flat.dtype != torch.float64:
        flat = flat.float()
    whole = flat.numel() - flat.numel() % ENERGY_CHUNK
    rows = flat[:whole].view(-1, ENERGY_CHUNK)
    tail = flat[whole:].double()
    return float(torch.linalg.vecdot(rows, rows).double().sum()) + float(torch.dot(tail, tail))


def _squared_norm(tensors: list[torch.Tensor]) -> float:
    return sum((_energy(t) for t in tensors), 0.0)


def _squared_error(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    if len(outputs) != len(reference):
        return math.nan
    owned = _owned(outputs, reference)
    total = 0.0
    for out, ref, own in zip(outputs, reference, owned):
        total += _energy(_difference(out.detach(), ref.detach(), own))
    return total


def _difference(out: torch.Tensor, ref: torch.Tensor, own: bool) -> torch.Tensor:
    """Return `out - ref` in float32, written over `out` where `own` allows it.

    The difference of two nearby float32 values is exact, so subtracting before widening to
    float64 loses nothing. Writing in place keeps the scoring peak at one float32 buffer besides
    the two outputs, for half-precision outputs too.
    """
    if out.dtype == torch.float64 or ref.dtype == torch.float64:
        return out.float() - ref.float()
    if out.dtype != torch.float32:
        # The widened copy is new, so it can take the difference in place.
        return out.float().sub_(ref)
    return out.sub_(ref) if own else out - ref


def _owned(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> list[bool]:
    """Flag the quantized outputs that share memory with no other output and no reference output.

    Only those may be overwritten, because an LSTM's final state, for one, may be a view of its
    output.
    """
    def storage(t: torch.Tensor) -> int:
        return t.untyped_storage().data_ptr()

    counts: dict[int, int] = {}
    for t in outputs:
        counts[storage(t)] = counts.get(storage(t), 0) + 1
    in_reference = {storage(t) for t in reference}
    return [counts[storage(t)] == 1 and storage(t) not in in_reference for t in outputs]


def _feature_dim(module_type: str, tensor: torch.Tensor) -> int:
    """Return the dimension of one position's features: channels for convolutions, else the last."""
    if "Conv" in module_type and module_type != "Conv1D" and tensor.dim() >= 3:
        return 1
    return -1


def _position_count(tensors: list[torch.Tensor], module_type: str) -> float:
    """Count the output positions: every index of each output but its feature dimension."""
    count = 0.0
    for tensor in tensors:
        if tensor.dim() == 0:
            count += 1.0
        else:
            count += tensor.numel() // max(tensor.shape[_feature_dim(module_type, tensor)], 1)
    return count


def _position_error(outputs: list[torch.Tensor], reference: list[torch.Tensor],
                    module_type: str) -> float:
    """Sum each output position's error energy divided by its own signal energy.

    A position is one token, pixel or sample. Dividing per position keeps a few positions with
    very large outputs (the massive activations that transformers put on special tokens) from
    hiding the error on all the others. Identical outputs give 0, and an error over a zero
    signal gives +inf.
    """
    if len(outputs) != len(reference):
        return math.nan
    relative = 0.0
    for out, ref in zip(outputs, reference):
        if ref.dim() == 0:
            ref, out = ref.reshape(1), out.reshape(1)
        dim = _feature_dim(module_type, ref)
        error = (out.detach().float() - ref.detach().float()).double().pow(2).sum(dim)
        signal = ref.detach().double().pow(2).sum(dim)
        ratio = torch.where(error == 0, torch.zeros_like(error), error / signal)
        relative += float(ratio.sum())
    return relative


def _count_nonfinite(value: Any) -> int:
    return sum(int((~torch.isfinite(t)).sum()) for t in float_tensors(value))


class _Scorer:
    def __init__(self, layers: list[LayerSpec], schemes: list[Scheme], bank: WeightBank,
                 activations: dict[str, ActivationParams], per_position: bool = False):
        self.layers = layers
        self.per_position = per_position
        self.schemes = schemes
        self.bank = bank
        self.activations = activations
        self.current: dict[str, LayerSums] = {}
        self.busy = False

    def hook(self, layer: LayerSpec, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.busy:  # the quantized reruns below call the module again
            return
        reference = list(float_tensors(output))
        if not any(t.numel() for t in reference):
            # A call on zero rows (an expert that no token was routed to) carries no data and
            # does not count. A layer that only gets such calls was never reached.
            return
        sums = self.current.setdefault(layer.name, LayerSums())
        sums.calls += 1
        # A finite output energy proves every output value finite. Values are counted only when
        # it is not, so the common case makes one pass over the output.
        signal = _squared_norm(reference)
        if not math.isfinite(signal):
            bad_inputs = _count_nonfinite((args, kwargs))
            if bad_inputs:
                sums.nonfinite_inputs += bad_inputs
            else:
                sums.nonfinite_outputs += _count_nonfinite(reference)
            return
        if self.per_position:
            # The position normalization divides by the number of positions instead.
            signal = _position_count(reference, layer.module_type)
        sums.denominator += signal

        self.busy = True
        try:
            for scheme in self.schemes:
                if scheme.name in layer.unfit:
                    continue
                outputs = self._scheme_outputs(layer, scheme, module, args, kwargs)
                if outputs is None:
                    error = math.nan
                elif self.per_position:
                    error = _position_error(outputs, reference, layer.module_type)
                else:
                    error = _squared_error(outputs, reference)
                sums.numerators[scheme.name] = sums.numerators.get(scheme.name, 0.0) + error
        finally:
            self.busy = False

    def _scheme_outputs(self, layer, scheme, module, args, kwargs) -> list[torch.Tensor] | None:
        """Run the layer with the scheme applied; return its outputs, or None where it cannot apply."""
        if _is_plain_lookup(module, args, kwargs):
            # An embedding call reads only the rows it looks up, so only those are dequantized
            # instead of the whole table (30522 rows in MiniLM against a few thousand tokens).
            weight = self.bank.get(layer.name, scheme.name)["weight"]
            ids = args[0]
            rows = weight.dequantize_rows_at(ids.reshape(-1))
            return [rows.reshape(*ids.shape, rows.shape[-1])]
        weights = self.bank.dequantized(layer.name, scheme.name)
        if scheme.quantize_input:
            params = self.activations.get(layer.name)
            if params is None or not args:
                # NOTE: a layer whose input arrives as a keyword argument gets NaN for w8a8, which
                # the plan treats as flagged; marking the scheme as not fitting would be clearer.
                return None
            args = (fake_quantize_activation(args[0], params), *args[1:])
        return list(float_tensors(functional_call(module, weights, args, kwargs)))


def _is_plain_lookup(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Check that this call is an `nn.Embedding` lookup whose output is just the indexed rows.

    `max_norm` renormalizes rows in place during the lookup, so such a module takes the general
    path through its own forward.
    """
    return (type(module) is nn.Embedding and module.max_norm is None and len(args) == 1
            and not kwargs and isinstance(args[0], torch.Tensor)
            and not args[0].is_floating_point())


@contextmanager
def _hooks(model: nn.Module, layers: list[LayerSpec], callback, pre: bool = False) -> Iterator[None]:
    handles = []
    for layer in layers:
        module = model.get_submodule(layer.name)
        if pre:
            fn = (lambda m, a, k, spec=layer: callback(spec, m, a, k))
            handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        else:
            fn = (lambda m, a, k, o, spec=layer: callback(spec, m, a, k, o))
            handles.append(module.register_forward_hook(fn, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def score_batches(model: nn.Module, layers: list[LayerSpec], schemes: list[Scheme],
                  bank: WeightBank, activations: dict[str, ActivationParams],
                  batches: Iterable[tuple[int, Batch]], progress=None,
                  run: Callable[[int, Any], Any] | None = None,
                  outputs: dict[int, Any] | None = None, per_position: bool = False) -> BatchSums:
    """Run the float model over indexed batches and return the QS sums of each batch.

    `run(index, batch)` replaces the call of the whole model, as block-by-block scoring does
    with one block; its results are kept in `outputs` by batch index when `outputs` is given.
    With `per_position`, the sums are those of the `position` normalization: per-position
    relative errors and the count of positions, instead of error and signal energies.
    """
    scorer = _Scorer(layers, schemes, bank, activations, per_position)
    partials: BatchSums = {}
    with torch.no_grad(), _hooks(model, layers, scorer.hook):
        for index, batch in batches:
            scorer.current = {}
            result = run(index, batch) if run is not None else call_model(model, batch, index)
            if outputs is not None:
                outputs[index] = result
            partials[index] = scorer.current
            if progress is not None:
                progress(1)
    return partials


def gather_activation_stats(model: nn.Module, layers: list[LayerSpec],
                            batches: Iterable[tuple[int, Batch]], progress=None) -> dict[str, Histogram]:
    """Histogram the first input of each layer that can take an input-quantized scheme."""
    eligible = [layer for layer in layers if "w8a8" not in layer.unfit]
    stats: dict[str, Histogram] = {}

    def observe(layer: LayerSpec, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # A layer that only gets empty inputs gets no histogram, because calibrating an empty
        # one would invent an input range.
        values = args[0] if args else None
        if isinstance(values, torch.Tensor) and values.is_floating_point() and values.numel():
            stats.setdefault(layer.name, Histogram()).observe(values)

    with torch.no_grad(), _hooks(model, eligible, observe, pre=True):
        for index, batch in batches:
            call_model(model, batch, index)
            if progress is not None:
                progress(1)
    return stats


def merge_stats(parts: list[dict[str, Histogram]]) -> dict[str, Histogram]:
    """Merge activation histograms computed on disjoint shares of the data; exact in any order."""
    merged: dict[str, Histogram] = {}
    for part in parts:
        for name, hist in part.items():
            merged[name] = merged[name].merge(hist) if name in merged else hist
    return merged
