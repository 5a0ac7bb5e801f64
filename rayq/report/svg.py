"""The two charts of the HTML page as inline SVG, built from the same data as the PNG pictures.

Every layer is a `<g class="layer">` with its index in `data-i`, so the page's script can look
it up for hover, search and zoom. Coordinates are SVG user units.
"""

from __future__ import annotations

import math
from html import escape

from rayq.report.data import (
    SensitivityData,
    ThresholdPoint,
    label_rows,
    merged_labels,
    qs_range,
    threshold_label,
)
from rayq.report.style import SCHEME_COLORS, scheme_color

COLUMN = 14  # width of one layer's column before the page's script fits it to the window
PLOT_HEIGHT = 320
LEFT, TOP, RIGHT = 70, 20, 20
# Room below the plot for the rotated layer names: about 6 px per character at 10 px text,
# capped so that a very long name is cut off (the tooltip shows it whole).
_NAME_PX_PER_CHAR, _NAME_ROOM_RANGE = 6, (60, 420)


def _log_y(value: float, low: float, high: float) -> float:
    span = math.log10(high) - math.log10(low)
    return TOP + (math.log10(high) - math.log10(value)) / span * PLOT_HEIGHT


def _marker(scheme: str, y: float, chosen: bool) -> str:
    """Return one QS marker centered on x = 0 of its layer's group."""
    color = SCHEME_COLORS.get(scheme, "#555555")
    ring = ' stroke="#000" stroke-width="1.4"' if chosen else ""
    size = 4.5 if chosen else 3.2
    if scheme == "int4":
        return (f'<path class="qs" d="M{-size:.1f},{y - size:.1f}L{size:.1f},{y - size:.1f}'
                f'L0,{y + size:.1f}Z" fill="{color}"{ring}/>')
    if scheme == "w8a8":
        return (f'<rect class="qs" x="{-size:.1f}" y="{y - size:.1f}" width="{2 * size:.1f}" '
                f'height="{2 * size:.1f}" fill="{color}"{ring}/>')
    return f'<circle class="qs" cx="0" cy="{y:.1f}" r="{size:.1f}" fill="{color}"{ring}/>'


def sensitivity_svg(data: SensitivityData) -> str:
    """Return the sensitivity chart: one column per layer, QS markers on a log axis.

    Each layer's group is drawn around x = 0 and placed by its `transform`, so the page's
    script zooms by moving groups and widening bands while markers and text keep their size.
    """
    low, high = qs_range(data)
    right_edge = LEFT + COLUMN * len(data.layers)
    width = right_edge + RIGHT
    longest = max((len(point.name) for point in data.layers), default=0)
    height = TOP + PLOT_HEIGHT + min(max(_NAME_PX_PER_CHAR * longest + 16, _NAME_ROOM_RANGE[0]),
                                     _NAME_ROOM_RANGE[1])
    name_y = TOP + PLOT_HEIGHT + 6
    parts = [(f'<svg id="sensitivity-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" '
              f'height="{height}" role="img" aria-label="per-layer sensitivity">')]
    parts += _log_axis(low, high, right_edge)
    for i, point in enumerate(data.layers):
        x = LEFT + COLUMN * (i + 0.5)
        cells = [f'<g class="layer" data-i="{i}" transform="translate({x:.1f},0)">',
                 (f'<rect class="band" x="{-COLUMN / 2}" y="{TOP}" width="{COLUMN}" '
                  f'height="{PLOT_HEIGHT}" fill="{scheme_color(point.scheme)}" '
                  'fill-opacity="0.2"/>')]
        for scheme in data.schemes:
            value = point.qs.get(scheme)
            if value is None or math.isnan(value):
                continue
            cells.append(_marker(scheme, _log_y(min(max(value, low), high), low, high),
                                 point.scheme == scheme))
        cells.append(f'<text class="name" x="3" y="{name_y}" transform="rotate(90 3 {name_y})">'
                     f'{escape(point.name)}</text></g>')
        parts.append("".join(cells))
    if data.threshold is not None:
        y = _log_y(max(data.threshold, low), low, high)
        parts.append(f'<line class="threshold span" x1="{LEFT}" x2="{right_edge}" y1="{y:.1f}" '
                     f'y2="{y:.1f}"/><text class="threshold-label" x="{LEFT + 4}" y="{y - 4:.1f}">'
                     f'{escape(threshold_label(data.threshold))}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _log_axis(low: float, high: float, right_edge: float) -> list[str]:
    parts = [f'<line class="axis" x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{TOP + PLOT_HEIGHT}"/>']
    for exponent in range(math.ceil(math.log10(low)), math.floor(math.log10(high)) + 1):
        y = _log_y(10.0 ** exponent, low, high)
        parts.append(f'<line class="grid span" x1="{LEFT}" x2="{right_edge}" y1="{y:.1f}" '
                     f'y2="{y:.1f}"/><text class="tick" x="{LEFT - 6}" y="{y + 4:.1f}" '
                     f'text-anchor="end">1e{exponent}</text>')
    return parts


# The size-error chart: a fixed frame, since the ladder has about a dozen points.
FRAME_WIDTH, FRAME_HEIGHT = 720, 380
_FRAME_LEFT, _FRAME_TOP, _FRAME_RIGHT, _FRAME_BOTTOM = 80, 20, 30, 50


def _scale(value: float, low: float, high: float, start: float, end: float) -> float:
    return start + (value - low) / ((high - low) or 1.0) * (end - start)


def thresholds_svg(points: list[ThresholdPoint]) -> str:
    """Return the size-error chart: predicted model MB against end-to-end relative error."""
    measured = sorted((p for p in points if p.relative_error is not None), key=lambda p: p.threshold)
    header = (f'<svg id="thresholds-chart" xmlns="http://www.w3.org/2000/svg" '
              f'viewBox="0 0 {FRAME_WIDTH} {FRAME_HEIGHT}" width="{FRAME_WIDTH}" '
              f'height="{FRAME_HEIGHT}" role="img" aria-label="model size against error">')
    if not measured:
        return (header + f'<text x="{FRAME_WIDTH / 2}" y="{FRAME_HEIGHT / 2}" text-anchor="middle">'
                'no end-to-end error was measured for this run</text></svg>')
    sizes = [p.model_bytes / 1e6 for p in measured]
    errors = [p.relative_error for p in measured]
    x_low, x_high = min(sizes) * 0.95, max(sizes) * 1.05
    y_low, y_high = 0.0, max(errors) * 1.1 or 1.0
    x_range = (_FRAME_LEFT, FRAME_WIDTH - _FRAME_RIGHT)
    y_range = (FRAME_HEIGHT - _FRAME_BOTTOM, _FRAME_TOP)

    def place(point: ThresholdPoint) -> tuple[float, float]:
        return (_scale(point.model_bytes / 1e6, x_low, x_high, *x_range),
                _scale(point.relative_error, y_low, y_high, *y_range))

    parts = [header, *_frame_axes(x_low, x_high, y_low, y_high)]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in map(place, measured))
    parts.append(f'<polyline class="ladder" points="{line}"/>')
    labels = merged_labels(measured)
    anchors = [(_scale(size_bytes / 1e6, x_low, x_high, *x_range), _scale(error, y_low, y_high, *y_range))
               for size_bytes, error in labels]
    for (x, y), text, row in zip(anchors, labels.values(), label_rows(anchors)):
        parts.append(f'<text class="point-label" x="{x + 7:.1f}" y="{y - 6 + 11 * row:.1f}">'
                     f'{escape(text)}</text>')
    for index, point in enumerate(points):
        if point.relative_error is None:
            continue
        x, y = place(point)
        kind = "point chosen" if point.chosen else "point"
        radius = 8 if point.chosen else 4.5
        parts.append(f'<circle class="{kind}" data-row="{index}" cx="{x:.1f}" cy="{y:.1f}" '
                     f'r="{radius}"/>')
    parts.append("</svg>")
    return "\n".join(parts)


def _frame_axes(x_low: float, x_high: float, y_low: float, y_high: float) -> list[str]:
    left, right = _FRAME_LEFT, FRAME_WIDTH - _FRAME_RIGHT
    bottom, top = FRAME_HEIGHT - _FRAME_BOTTOM, _FRAME_TOP
    parts = [f'<line class="axis" x1="{left}" x2="{right}" y1="{bottom}" y2="{bottom}"/>',
             f'<line class="axis" x1="{left}" x2="{left}" y1="{top}" y2="{bottom}"/>']
    for step in range(5):
        x_value = x_low + (x_high - x_low) * step / 4
        y_value = y_low + (y_high - y_low) * step / 4
        x = _scale(x_value, x_low, x_high, left, right)
        y = _scale(y_value, y_low, y_high, bottom, top)
        parts.append(f'<text class="tick" x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">'
                     f'{x_value:.3g}</text>')
        parts.append(f'<line class="grid" x1="{left}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}"/>'
                     f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
                     f'{y_value:.3g}</text>')
    parts.append(f'<text class="axis-title" x="{(left + right) / 2}" y="{FRAME_HEIGHT - 10}" '
                 'text-anchor="middle">predicted model size (MB)</text>')
    parts.append(f'<text class="axis-title" x="16" y="{(top + bottom) / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 16 {(top + bottom) / 2})">end-to-end relative error</text>')
    return parts
