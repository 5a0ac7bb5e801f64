"""The run's static pictures as PNG bytes, drawn with matplotlib's Agg backend (no display).

Importing this module raises ImportError without matplotlib; `rayq.report.picture_files`
turns that into a WARNING and writes the run without the PNGs.
"""

from __future__ import annotations

import io
import math

import matplotlib
import numpy as np

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pyarrow as pa
from matplotlib.figure import Figure
from PIL import Image

from rayq.errors import DataError
from rayq.report.data import (
    SensitivityData,
    ThresholdPoint,
    axis_labels,
    label_rows,
    merged_labels,
    qs_range,
    threshold_label,
)
from rayq.report.style import SCHEME_COLORS, SCHEME_MARKERS, scheme_color

DPI = 100
# The figure is 0.22 inch wide per layer, within 8 to 16 inches.
_WIDTH_PER_LAYER_IN = 0.22
_WIDTH_RANGE_IN = (8.0, 16.0)


def png_bytes(figure: Figure) -> bytes:
    """Render a figure to an 8-bit palette PNG and close it.

    A palette of 256 colors keeps the anti-aliasing and makes a 300-layer picture about a
    third of the size of matplotlib's RGBA output (about 70 kB instead of 210 kB).
    """
    rendered = io.BytesIO()
    figure.savefig(rendered, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(figure)
    image = Image.open(rendered).convert("RGB").quantize(colors=256,
                                                         method=Image.Quantize.MEDIANCUT)
    sink = io.BytesIO()
    image.save(sink, format="PNG", optimize=True)
    return sink.getvalue()


def sensitivity_png(data: SensitivityData, title: str = "Per-layer sensitivity") -> bytes:
    """Draw each layer's QS per scheme on a log axis, the threshold line and the plan's choice."""
    count = len(data.layers)
    width = min(max(count * _WIDTH_PER_LAYER_IN, _WIDTH_RANGE_IN[0]), _WIDTH_RANGE_IN[1])
    figure, axes = plt.subplots(figsize=(width, 5.5))
    low, high = qs_range(data)
    axes.set_yscale("log")
    axes.set_ylim(low, high)
    # A model without quantizable layers still gets a (blank) axis one layer wide.
    axes.set_xlim(-0.5, max(count, 1) - 0.5)

    _draw_plan_bands(axes, data)
    for scheme in data.schemes:
        _draw_scheme(axes, data, scheme, low, high)
    if data.threshold is not None:
        axes.axhline(max(data.threshold, low), color="black", linestyle="--", linewidth=1.2,
                     label=threshold_label(data.threshold))
    _label_layers(axes, [point.name for point in data.layers])

    label = "end-to-end QS" if data.score_column == "qs_end_to_end" else "QS"
    axes.set_ylabel(f"{label} (log scale; 0 at the bottom edge, inf at the top)")
    axes.set_title(title)
    axes.grid(axis="y", which="major", alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small",
                title="background: plan", title_fontsize="small")
    return png_bytes(figure)


def _draw_plan_bands(axes, data: SensitivityData) -> None:
    """Shade each run of layers in the color of the scheme the plan gave them.

    One span per run rather than per layer: abutting spans leave anti-aliased seams.
    """
    seen = set()
    start = 0
    for i, point in enumerate(data.layers):
        last = i + 1 == len(data.layers)
        if last or data.layers[i + 1].scheme != point.scheme:
            label = None if point.scheme in seen else f"plan: {point.scheme}"
            seen.add(point.scheme)
            axes.axvspan(start - 0.5, i + 0.5, color=scheme_color(point.scheme), alpha=0.2,
                         linewidth=0, label=label)
            start = i + 1


def _draw_scheme(axes, data: SensitivityData, scheme: str, low: float, high: float) -> None:
    """Plot one scheme's scores; zero sits on the bottom edge and +inf on the top edge."""
    xs, ys, chosen_xs, chosen_ys = [], [], [], []
    for i, point in enumerate(data.layers):
        value = point.qs.get(scheme)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        y = value
        if value <= 0:
            y = low
        elif math.isinf(value):
            y = high
        xs.append(i)
        ys.append(y)
        if point.scheme == scheme:
            chosen_xs.append(i)
            chosen_ys.append(y)
    color = SCHEME_COLORS.get(scheme, "#555555")
    marker = SCHEME_MARKERS.get(scheme, "o")
    axes.scatter(xs, ys, s=18, color=color, marker=marker, label=f"QS {scheme}", zorder=3,
                 clip_on=False)
    # The scheme the plan chose gets a black ring, so the choice reads without the background.
    axes.scatter(chosen_xs, chosen_ys, s=60, facecolors="none", edgecolors="black",
                 linewidths=0.9, marker="o", zorder=4, clip_on=False,
                 label="ring: the plan's choice" if scheme == data.schemes[-1] else None)


def _label_layers(axes, names: list[str]) -> None:
    labels = axis_labels(names)
    axes.set_xticks([label.position for label in labels])
    axes.set_xticklabels([label.text for label in labels], rotation=90, fontsize=7)
    for label in labels:
        if label.group_start and label.position > 0:
            axes.axvline(label.position - 0.5, color="grey", linewidth=0.6, alpha=0.6)
    grouped = any(label.group_start for label in labels)
    axes.set_xlabel(f"layer in model order ({len(names)} layers"
                    + ("; labels mark the first layer of each block)" if grouped else ")"))


def thresholds_png(points: list[ThresholdPoint], title: str = "Size against error") -> bytes:
    """Draw model size against the end-to-end relative error for every threshold of the ladder."""
    measured = sorted((p for p in points if p.relative_error is not None),
                      key=lambda p: p.threshold)
    figure, axes = plt.subplots(figsize=(8.0, 5.0))
    if not measured:
        axes.text(0.5, 0.5, "no end-to-end error was measured for this run",
                  ha="center", va="center", transform=axes.transAxes)
        axes.set_axis_off()
        return png_bytes(figure)

    sizes = [p.model_bytes / 1e6 for p in measured]
    errors = [p.relative_error for p in measured]
    axes.plot(sizes, errors, color="#4c72b0", marker="o", markersize=5, linewidth=1.2,
              label="threshold ladder")
    _label_points(axes, merged_labels(measured))
    for point in measured:
        if point.chosen:
            axes.scatter([point.model_bytes / 1e6], [point.relative_error], s=220, marker="*",
                         color="#dd8452", edgecolors="black", zorder=5,
                         label=f"chosen threshold {point.threshold:g}")
    axes.set_xlabel("predicted model size (MB)")
    axes.set_ylabel("end-to-end relative error")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    _ratio_axis(axes, measured)
    return png_bytes(figure)


def _label_points(axes, labels: dict[tuple[int, float], str]) -> None:
    """Write each point's thresholds beside it, stacking the labels of close points."""
    positions = [(size_bytes / 1e6, error) for size_bytes, error in labels]
    axes.autoscale_view()  # transData follows the plotted data only once the limits are set
    # Points per pixel: offsets are in points, anchors come out of transData in pixels.
    scale = 72 / axes.figure.dpi
    anchors = [(x * scale, -y * scale) for x, y in axes.transData.transform(positions)]
    for (position, text), row in zip(zip(positions, labels.values()), label_rows(anchors)):
        axes.annotate(text, position, textcoords="offset points", xytext=(6, 4 - 11 * row),
                      fontsize=7, color="#333333")


def _ratio_axis(axes, points: list[ThresholdPoint]) -> None:
    """Add the compression ratio as a top axis: ratio = float MB / MB."""
    with_ratio = [p for p in points if p.compression_ratio]
    if not with_ratio:
        return
    float_mb = with_ratio[0].model_bytes * with_ratio[0].compression_ratio / 1e6

    def to_ratio(mb):
        return float_mb / np.maximum(mb, 1e-12)

    top = axes.secondary_xaxis("top", functions=(to_ratio, to_ratio))
    top.set_xticks(_ratio_ticks(float_mb, axes.get_xlim()))
    top.set_xlabel("compression ratio (x)")


# Candidate ticks of the compression-ratio axis. The axis is 1 / size, so its ticks crowd toward
# small sizes, and evenly spaced ratios would print on top of each other there.
RATIO_TICKS = (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32)
# The minimum distance between two ratio ticks, as a fraction of the size axis.
RATIO_TICK_GAP = 0.06


def _ratio_ticks(float_mb: float, limits: tuple[float, float]) -> list[float]:
    """Pick the ratio ticks inside the size axis, from the lowest ratio up, dropping crowded ones."""
    low, high = sorted(limits)
    ticks: list[float] = []
    last_mb = None
    for ratio in RATIO_TICKS:
        mb = float_mb / ratio
        if not low <= mb <= high:
            continue
        if last_mb is not None and last_mb - mb < RATIO_TICK_GAP * (high - low):
            continue
        ticks.append(ratio)
        last_mb = mb
    return ticks


FLEET_COLUMNS = ("model", "compression_ratio", "relative_error")


def fleet_png(models: pa.Table, title: str = "Fleet: compression against error") -> bytes:
    """Draw one point per model: its compression ratio against its end-to-end relative error.

    `models` has one row per model with the columns `model`, `compression_ratio` and
    `relative_error`; rows without an error are listed under the axes instead of drawn.
    """
    missing = [name for name in FLEET_COLUMNS if name not in models.column_names]
    if missing:
        raise DataError(f"the fleet table is missing the columns {', '.join(missing)}; it needs "
                        f"{', '.join(FLEET_COLUMNS)}, one row per model")
    rows = models.select(list(FLEET_COLUMNS)).to_pylist()
    drawn = [r for r in rows if r["relative_error"] is not None and r["compression_ratio"]]
    figure, axes = plt.subplots(figsize=(8.0, 5.0))
    axes.scatter([r["compression_ratio"] for r in drawn], [r["relative_error"] for r in drawn],
                 s=40, color="#4c72b0", zorder=3)
    for row in drawn:
        axes.annotate(row["model"], (row["compression_ratio"], row["relative_error"]),
                      textcoords="offset points", xytext=(6, 4), fontsize=8)
    skipped = [r["model"] for r in rows if r not in drawn]
    if skipped:
        axes.text(0.0, -0.15, "not drawn (no error measured): " + ", ".join(skipped),
                  transform=axes.transAxes, fontsize=8, color="#8c1c13")
    axes.set_xlabel("compression ratio (float bytes / compressed bytes)")
    axes.set_ylabel("end-to-end relative error")
    axes.set_title(f"{title} ({len(drawn)} of {len(rows)} models)")
    axes.grid(alpha=0.3)
    return png_bytes(figure)
