"""The tables of a run as `pyarrow.Table`s: sensitivity, plan and threshold guidance.

Column names carry their unit where they have one (bytes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyarrow as pa
from torch import nn

from rayq.model.layers import FloatModule, LayerSpec, weight_of
from rayq.planning.plan import Decision
from rayq.quant.activations import ActivationParams
from rayq.quant.schemes import FLOAT, SCHEMES
from rayq.scoring.sensitivity import LayerSums, qs_value

SENSITIVITY_SCHEMA = pa.schema([
    ("layer", pa.string()), ("module_type", pa.string()), ("scheme", pa.string()),
    ("parameter_count", pa.int64()), ("calls", pa.int64()), ("qs", pa.float64()),
    ("qs_numerator", pa.float64()), ("qs_denominator", pa.float64()),
    ("bytes_before", pa.int64()), ("bytes_after", pa.int64()),
    ("fits", pa.bool_()), ("unfit_reason", pa.string()),
    ("nonfinite_inputs", pa.int64()), ("nonfinite_outputs", pa.int64()),
    ("tied_with", pa.string()), ("input_scale", pa.float32()), ("input_zero_point", pa.int32()),
    ("qs_end_to_end", pa.float64()), ("qs_end_to_end_numerator", pa.float64()),
    ("qs_end_to_end_denominator", pa.float64()), ("flag", pa.string()),
])

# A NaN QS numerator (local or end-to-end) is stored as null, with this flag on its row.
NOT_FINITE_FLAG = "quantized output not finite"

PLAN_SCHEMA = pa.schema([
    ("layer", pa.string()), ("module_type", pa.string()), ("scheme", pa.string()),
    ("reason", pa.string()), ("qs", pa.float64()), ("parameter_count", pa.int64()),
    ("bytes_before", pa.int64()), ("bytes_after", pa.int64()), ("quantizable", pa.bool_()),
])


@dataclass(frozen=True)
class LayerBytes:
    """Bytes of a layer's quantizable weights as float and under each scheme that fits."""

    before: int
    after: dict[str, int]


def layer_bytes(model: nn.Module, layer: LayerSpec) -> LayerBytes:
    before = 0
    after = {name: 0 for name in SCHEMES if name not in layer.unfit}
    for ref in layer.weights:
        weight = weight_of(model, layer, ref)
        before += weight.numel() * weight.element_size()
        rows = ref.layout.row_count(weight.shape)
        columns = weight.numel() // max(rows, 1)
        for name in after:
            after[name] += SCHEMES[name].weight_bytes(rows, columns)
    for name in after:
        after[name] += SCHEMES[name].extra_bytes()
    return LayerBytes(before, after)


def state_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer, counting shared tensors once."""
    seen: dict[int, int] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def sensitivity_table(layers: list[LayerSpec], totals: dict[str, LayerSums], schemes: list[str],
                      sizes: dict[str, LayerBytes], activations: dict[str, ActivationParams]) -> pa.Table:
    rows = []
    for layer in layers:
        sums = totals[layer.name]
        for scheme in schemes:
            fits = scheme not in layer.unfit
            numerator = sums.numerators.get(scheme) if fits and sums.calls else None
            end_to_end = sums.end_to_end.get(scheme)
            flagged = any(value is not None and math.isnan(value)
                          for value in (numerator, end_to_end))
            numerator = finite_or_none(numerator)
            params = activations.get(layer.name) if SCHEMES[scheme].quantize_input else None
            rows.append({
                "layer": layer.name, "module_type": layer.module_type, "scheme": scheme,
                "parameter_count": layer.parameter_count, "calls": sums.calls,
                "qs": qs_value(numerator, sums.denominator) if numerator is not None else None,
                "qs_numerator": numerator, "qs_denominator": sums.denominator if sums.calls else None,
                "bytes_before": sizes[layer.name].before,
                "bytes_after": sizes[layer.name].after.get(scheme),
                "fits": fits, "unfit_reason": layer.unfit.get(scheme),
                "nonfinite_inputs": sums.nonfinite_inputs, "nonfinite_outputs": sums.nonfinite_outputs,
                "tied_with": ",".join(layer.tied_with) or None,
                "input_scale": params.scale if params else None,
                "input_zero_point": params.zero_point if params else None,
                **_end_to_end_columns(sums, scheme),
                "flag": NOT_FINITE_FLAG if flagged else None,
            })
    return pa.Table.from_pylist(rows, schema=SENSITIVITY_SCHEMA)


def _end_to_end_columns(sums: LayerSums, scheme: str) -> dict:
    numerator = finite_or_none(sums.end_to_end.get(scheme))
    if numerator is None or not sums.calls:
        # Quantizing a layer that calibration never reached changes no output, so its zero
        # error is no evidence and the layer gets no end-to-end score either.
        return {"qs_end_to_end": None, "qs_end_to_end_numerator": None,
                "qs_end_to_end_denominator": None}
    return {"qs_end_to_end": qs_value(numerator, sums.end_to_end_denominator),
            "qs_end_to_end_numerator": numerator,
            "qs_end_to_end_denominator": sums.end_to_end_denominator}


def plan_table(layers: list[LayerSpec], kept: list[FloatModule], decisions: list[Decision],
               sizes: dict[str, LayerBytes], qs: dict[tuple[str, str], float]) -> pa.Table:
    by_name = {layer.name: layer for layer in layers}
    rows = []
    for decision in decisions:
        layer = by_name[decision.layer]
        size = sizes[layer.name]
        chosen = decision.scheme
        rows.append({
            "layer": layer.name, "module_type": layer.module_type, "scheme": chosen,
            "reason": decision.reason, "qs": qs.get((layer.name, chosen)) if chosen != FLOAT else None,
            "parameter_count": layer.parameter_count, "bytes_before": size.before,
            "bytes_after": size.before if chosen == FLOAT else size.after[chosen], "quantizable": True,
        })
    for module in kept:
        rows.append({
            "layer": module.name, "module_type": module.module_type, "scheme": FLOAT,
            "reason": module.reason, "qs": None, "parameter_count": module.parameter_count,
            "bytes_before": None, "bytes_after": None, "quantizable": False,
        })
    return pa.Table.from_pylist(rows, schema=PLAN_SCHEMA)


def finite_or_none(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def model_bytes(float_bytes: int, layers: list[LayerSpec], decisions: list[Decision],
                sizes: dict[str, LayerBytes]) -> int:
    """Predicted bytes of the compressed model's weights, counting tied weights once."""
    total = float_bytes
    counted: set[frozenset[str]] = set()
    by_name = {layer.name: layer for layer in layers}
    for decision in decisions:
        if decision.scheme == FLOAT:
            continue
        group = frozenset([decision.layer, *by_name[decision.layer].tied_with])
        if group in counted:
            continue
        counted.add(group)
        size = sizes[decision.layer]
        total += size.after[decision.scheme] - size.before
    return total

