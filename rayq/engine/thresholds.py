"""The threshold guidance table: size and end-to-end error for a ladder of thresholds."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa

from rayq.engine.evaluate import Fidelity
from rayq.planning.plan import Decision
from rayq.quant.schemes import FLOAT, SCHEMES

LADDER = (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 5e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
RECOMMENDED_THRESHOLD = 0.005

logger = logging.getLogger(__name__)

THRESHOLDS_SCHEMA = pa.schema(
    [("threshold", pa.float64()), ("chosen", pa.bool_())]
    + [(f"layers_{name}", pa.int64()) for name in (*SCHEMES, FLOAT)]
    + [("model_bytes", pa.int64()), ("compression_ratio", pa.float64()),
       ("relative_error", pa.float64()), ("cosine_mean", pa.float64()),
       ("cosine_min", pa.float64()), ("in_sample", pa.bool_())]
)


@dataclass(frozen=True)
class ThresholdRow:
    threshold: float
    decisions: list[Decision]
    model_bytes: int
    fidelity: Fidelity | None


def thresholds_table(chosen: float, rows: list[ThresholdRow], float_bytes: int,
                     in_sample: bool) -> pa.Table:
    records = []
    for row in rows:
        counts = {name: 0 for name in (*SCHEMES, FLOAT)}
        for decision in row.decisions:
            counts[decision.scheme] += 1
        fidelity = row.fidelity
        records.append({
            "threshold": row.threshold, "chosen": row.threshold == chosen,
            **{f"layers_{k}": v for k, v in counts.items()},
            "model_bytes": row.model_bytes,
            "compression_ratio": float_bytes / row.model_bytes if row.model_bytes else None,
            "relative_error": fidelity.relative_error if fidelity else None,
            "cosine_mean": fidelity.cosine_mean if fidelity else None,
            "cosine_min": fidelity.cosine_min if fidelity else None,
            "in_sample": in_sample,
        })
    return pa.Table.from_pylist(records, schema=THRESHOLDS_SCHEMA)


def ladder_with(chosen: float, ladder: tuple[float, ...] = LADDER) -> list[float]:
    return sorted(set(ladder) | {chosen})


def plan_key(decisions: list[Decision]) -> tuple:
    return tuple((d.layer, d.scheme) for d in decisions)


def evaluate_ladder(thresholds: list[float], plan_for: Callable[[float], list[Decision]],
                    bytes_for: Callable[[list[Decision]], int],
                    fidelity_for: Callable[[list[Decision]], Fidelity] | None,
                    known: dict[tuple, Fidelity] | None = None) -> list[ThresholdRow]:
    """Plan each threshold and measure each distinct plan once.

    Plans in `known` reuse their stored error. Without `fidelity_for`, other plans get none.
    """
    measured: dict[tuple, Fidelity] = dict(known or {})
    plans = [(threshold, plan_for(threshold)) for threshold in thresholds]
    pending = {plan_key(d) for _, d in plans} - set(measured)
    if fidelity_for is not None and pending:
        logger.info("measuring %d distinct plans end to end", len(pending))
    rows = []
    for threshold, decisions in plans:
        key = plan_key(decisions)
        if key not in measured and fidelity_for is not None:
            measured[key] = fidelity_for(decisions)
            logger.info("threshold %g measured (%d of %d plans)", threshold,
                        len(pending) - len(pending - set(measured)), len(pending))
        rows.append(ThresholdRow(threshold, decisions, bytes_for(decisions), measured.get(key)))
    return rows
