"""`report.html`: one self-contained page with both charts and every row of the run's tables.

The page loads nothing from the network: the charts are inline SVG and the stylesheet and script
are inline too, so it opens from a local file, an S3 download or an e-mail attachment alike.
"""

from __future__ import annotations

import json
import math
from html import escape

import pyarrow as pa

from rayq.report.data import sensitivity_data, threshold_points
from rayq.report.script import SCRIPT, STYLE
from rayq.report.style import SCHEME_COLORS
from rayq.report.svg import LEFT, RIGHT, sensitivity_svg, thresholds_svg

THRESHOLD_COLUMNS = ("threshold", "layers_int4", "layers_w8a8", "layers_int8", "layers_float",
                     "model_bytes", "compression_ratio", "relative_error", "cosine_mean",
                     "cosine_min", "in_sample")
PLAN_COLUMNS = ("layer", "module_type", "scheme", "qs", "reason", "parameter_count",
                "bytes_before", "bytes_after", "quantizable")
SENSITIVITY_COLUMNS = ("layer", "module_type", "scheme", "qs", "qs_end_to_end", "calls",
                       "parameter_count", "bytes_before", "bytes_after", "fits", "unfit_reason",
                       "flag")


def _json_value(value):
    """Return a value JSON can carry: +inf, -inf and NaN become strings, as JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(table: pa.Table, columns: tuple[str, ...], table_id: str, layer_rows: bool) -> str:
    present = [name for name in columns if name in table.column_names]
    head = "".join(f"<th>{escape(name)}</th>" for name in present)
    rows = []
    for row in table.select(present).to_pylist():
        attributes = f' data-layer="{escape(row["layer"])}"' if layer_rows else ""
        if row.get("chosen"):
            attributes += ' class="chosen"'
        cells = "".join(
            f'<td class="text">{escape(_cell(row[name]))}</td>' if isinstance(row[name], str)
            else f"<td>{escape(_cell(row[name]))}</td>" for name in present)
        rows.append(f"<tr{attributes}>{cells}</tr>")
    return (f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>'
            + "\n".join(rows) + "</tbody></table>")


def _page_data(sensitivity: pa.Table, plan: pa.Table, thresholds: pa.Table) -> tuple[dict, object]:
    data = sensitivity_data(sensitivity, plan, thresholds)
    layers = [{"name": p.name, "module_type": p.module_type, "scheme": p.scheme, "reason": p.reason,
               "parameter_count": p.parameter_count,
               "qs": {k: _json_value(v) for k, v in p.qs.items()}} for p in data.layers]
    rows = [{k: _json_value(v) for k, v in row.items()} for row in thresholds.to_pylist()]
    label = "end-to-end QS" if data.score_column == "qs_end_to_end" else "QS"
    return {"layers": layers, "thresholds": rows, "schemes": data.schemes,
            "score_label": label, "margin_left": LEFT, "margin_right": RIGHT}, data


def _script_json(payload: dict) -> str:
    # "<" is escaped so that no layer name can close the script element early.
    return json.dumps(payload, allow_nan=False).replace("<", "\\u003c")


def _legend(schemes: list[str]) -> str:
    items = [f'<span><i style="background:{SCHEME_COLORS.get(s, "#555")}"></i>{escape(s)}</span>'
             for s in [*schemes, "float"]]
    return ('<div class="legend">Markers: QS per candidate scheme (ringed: the plan\'s choice). '
            "Background: the scheme the plan gave the layer. " + "".join(items) + "</div>")


def report_html(sensitivity: pa.Table, plan: pa.Table, thresholds: pa.Table,
                title: str = "rayq run") -> str:
    """Return the page for a run's three tables."""
    payload, data = _page_data(sensitivity, plan, thresholds)
    chosen = f"{data.threshold:g}" if data.threshold is not None else "none"
    points = threshold_points(thresholds)
    in_sample = bool(points) and thresholds["in_sample"][0].as_py()
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{escape(title)}</h1>
<p>Chosen threshold: <b>{chosen}</b>. {len(data.layers)} quantizable layers, {len(points)}
thresholds in the guidance table{" (errors measured in-sample, on the calibration batches)"
                                 if in_sample else ""}.</p>
<h2>Per-layer sensitivity</h2>
{_legend(data.schemes)}
<div class="controls">
<input id="layer-search" type="search" placeholder="search layers by name" aria-label="search layers">
<span id="search-count"></span>
<button id="zoom-out" type="button">zoom out</button>
<button id="zoom-in" type="button">zoom in</button>
<button id="zoom-fit" type="button">fit</button> <span id="zoom-level"></span>
<span>(Ctrl + wheel zooms; hover a layer for its scores and the plan's reason)</span>
</div>
<div class="chart">{sensitivity_svg(data)}</div>
<h2>Size against error</h2>
<div class="chart">{thresholds_svg(points)}</div>
<h2>Threshold guidance</h2>
{_table(thresholds, ("chosen", *THRESHOLD_COLUMNS), "thresholds-table", layer_rows=False)}
<h2>Plan</h2>
{_table(plan, PLAN_COLUMNS, "plan-table", layer_rows=True)}
<h2>Sensitivity</h2>
{_table(sensitivity, SENSITIVITY_COLUMNS, "sensitivity-table", layer_rows=True)}
<div id="tooltip" role="tooltip"></div>
<script type="application/json" id="report-data">{_script_json(payload)}</script>
<script>{SCRIPT}</script>
</body></html>
"""
