"""The data behind the pictures, taken from a run's tables by pure functions with no plotting library.

The sensitivity picture shows the score the plan compared with the threshold: the end-to-end QS
where the sensitivity table has one (`sensitivity_mode: end_to_end`), else the local QS.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import pyarrow as pa

from rayq.quant.schemes import FLOAT, SCHEMES

# At most this many layer names on an axis; longer lists are grouped by block or thinned.
MAX_AXIS_LABELS = 48
# A group key is a name up to and including its first numeric part, such as `encoder.layer.3`.
_BLOCK = re.compile(r"^(.*?\.\d+)(\.|$)")


@dataclass(frozen=True)
class LayerPoint:
    """One quantizable layer in model order: its QS per candidate scheme and the plan's choice."""

    name: str
    module_type: str
    qs: dict[str, float | None]
    scheme: str
    reason: str
    parameter_count: int


@dataclass(frozen=True)
class SensitivityData:
    layers: list[LayerPoint]
    schemes: list[str]
    threshold: float | None
    score_column: str


@dataclass(frozen=True)
class AxisLabel:
    position: int
    text: str
    # True where the label starts a group of layers, so a separator line belongs there.
    group_start: bool = False


def chosen_threshold(thresholds: pa.Table) -> float | None:
    rows = [row for row in thresholds.to_pylist() if row["chosen"]]
    return rows[0]["threshold"] if rows else None


def score_column(sensitivity: pa.Table) -> str:
    """Return `qs_end_to_end` where the run scored end to end, else `qs`."""
    if "qs_end_to_end" in sensitivity.column_names and \
            sensitivity["qs_end_to_end"].null_count < len(sensitivity):
        return "qs_end_to_end"
    return "qs"


def sensitivity_data(sensitivity: pa.Table, plan: pa.Table, thresholds: pa.Table) -> SensitivityData:
    """Collect each quantizable layer's scores and plan decision, in the sensitivity table's order."""
    column = score_column(sensitivity)
    decisions = {row["layer"]: row for row in plan.to_pylist() if row["quantizable"]}
    schemes = sorted(dict.fromkeys(sensitivity["scheme"].to_pylist()),
                     key=lambda name: SCHEMES[name].rank if name in SCHEMES else len(SCHEMES))
    layers: dict[str, dict] = {}
    for row in sensitivity.to_pylist():
        entry = layers.setdefault(row["layer"], {"module_type": row["module_type"], "qs": {},
                                                 "parameter_count": row["parameter_count"]})
        entry["qs"][row["scheme"]] = row[column]
    points = []
    for name, entry in layers.items():
        decision = decisions.get(name, {"scheme": FLOAT, "reason": "not in the plan"})
        points.append(LayerPoint(name, entry["module_type"], entry["qs"], decision["scheme"],
                                 decision["reason"], entry["parameter_count"]))
    return SensitivityData(points, schemes, chosen_threshold(thresholds), column)


def qs_range(data: SensitivityData) -> tuple[float, float]:
    """Return the lowest and highest finite positive QS, padded so both sit inside a log axis.

    Zero and +inf cannot be drawn on a log axis, so the pictures put them on the bottom and top
    edges of this range, marked as such.
    """
    values = [value for point in data.layers for value in point.qs.values()
              if value is not None and 0 < value < math.inf]
    if data.threshold:
        values.append(data.threshold)
    if not values:
        return 1e-6, 1.0
    low, high = min(values), max(values)
    return 10 ** (math.floor(math.log10(low)) - 0.5), 10 ** (math.ceil(math.log10(high)) + 0.5)


def threshold_label(threshold: float) -> str:
    # A log axis has no 0, so threshold 0 sits on the bottom edge like scores of 0.
    if threshold == 0:
        return "threshold 0 (bottom edge)"
    return f"threshold {threshold:g}"


def axis_labels(names: list[str], max_labels: int = MAX_AXIS_LABELS) -> list[AxisLabel]:
    """Label every layer of a short list; group long lists by block, or thin them evenly."""
    if len(names) <= max_labels:
        return [AxisLabel(i, name) for i, name in enumerate(names)]
    groups = _group_starts(names)
    if 1 < len(groups) <= max_labels:
        return [AxisLabel(i, key, group_start=True) for i, key in groups]
    step = math.ceil(len(names) / max_labels)
    return [AxisLabel(i, names[i]) for i in range(0, len(names), step)]


def _group_starts(names: list[str]) -> list[tuple[int, str]]:
    """Return the index and key where each run of layers with the same block key starts."""
    starts = []
    previous = None
    for i, name in enumerate(names):
        match = _BLOCK.match(name)
        key = match.group(1) if match else name
        if key != previous:
            starts.append((i, key))
            previous = key
    return starts


@dataclass(frozen=True)
class ThresholdPoint:
    threshold: float
    chosen: bool
    model_bytes: int
    compression_ratio: float | None
    relative_error: float | None
    cosine_mean: float | None


def threshold_points(thresholds: pa.Table) -> list[ThresholdPoint]:
    return [ThresholdPoint(row["threshold"], row["chosen"], row["model_bytes"],
                           row["compression_ratio"], row["relative_error"], row["cosine_mean"])
            for row in thresholds.to_pylist()]


def merged_labels(points: list[ThresholdPoint]) -> dict[tuple[int, float | None], str]:
    """Label each distinct (bytes, error) point with every threshold that lands on it.

    Several thresholds often give the same plan, so their points coincide and one label
    such as `1e-04, 3e-04` replaces overlapping ones.
    """
    labels: dict[tuple[int, float | None], list[str]] = {}
    for point in points:
        labels.setdefault((point.model_bytes, point.relative_error), []).append(f"{point.threshold:g}")
    return {key: ", ".join(texts) for key, texts in labels.items()}


def label_rows(anchors: list[tuple[float, float]], width: float = 45.0,
               height: float = 11.0) -> list[int]:
    """Return a text row for each label so that labels of nearby points do not overlap.

    `anchors` are the labelled points in display units (pixels, y pointing down). A label goes
    one row further down for every earlier label whose anchor lies within `width` to the side
    and `height` above or below, so close points get stacked labels instead of overprinted ones.
    """
    rows: list[int] = []
    for i, (x, y) in enumerate(anchors):
        taken = {rows[j] for j in range(i)
                 if abs(anchors[j][0] - x) < width
                 and abs((anchors[j][1] + rows[j] * height) - y) < height * (1 + rows[j])}
        row = 0
        while row in taken:
            row += 1
        rows.append(row)
    return rows
