"""Rebuild the scores of a finished run from its sensitivity table, for re-planning."""

from __future__ import annotations

import math

import pyarrow as pa

from rayq.engine.compress import Prepared, Scores
from rayq.errors import StorageError
from rayq.quant.activations import ActivationParams
from rayq.scoring.sensitivity import LayerSums


def scores_from_table(table: pa.Table, prepared: Prepared, mode: str = "local") -> Scores:
    """Match stored rows to the layers of the re-loaded float model; raise if they differ."""
    rows = table.to_pylist()
    stored_layers = list(dict.fromkeys(r["layer"] for r in rows))
    found = [layer.name for layer in prepared.layers]
    if stored_layers != found:
        raise StorageError("the stored sensitivity table does not match the model's layers "
                           f"({len(stored_layers)} stored, {len(found)} found); was the model "
                           "source changed after the run?")
    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    totals: dict[str, LayerSums] = {}
    activations: dict[str, ActivationParams] = {}
    for row in rows:
        sums = totals.setdefault(row["layer"], LayerSums(
            calls=row["calls"], denominator=row["qs_denominator"] or 0.0,
            nonfinite_inputs=row["nonfinite_inputs"], nonfinite_outputs=row["nonfinite_outputs"]))
        if row["fits"] and row["calls"]:
            numerator = row["qs_numerator"]
            sums.numerators[row["scheme"]] = math.nan if numerator is None else numerator
        if row.get("qs_end_to_end_numerator") is not None:
            sums.end_to_end[row["scheme"]] = row["qs_end_to_end_numerator"]
            sums.end_to_end_denominator = row["qs_end_to_end_denominator"]
        if row["input_scale"] is not None:
            activations[row["layer"]] = ActivationParams(row["input_scale"], row["input_zero_point"])
    return Scores(prepared.layers, prepared.kept, totals, activations, schemes, mode)
