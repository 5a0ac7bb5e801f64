"""A run's pictures: `sensitivity.png` and `thresholds.png` (matplotlib) and `report.html`.

The numerics never import this package; it only reads the three tables a run already has.
`rayq.report.pictures.fleet_png` draws one point per model from a table with one row per model,
for a fleet report.
"""

from __future__ import annotations

import logging
import os

import pyarrow as pa

from rayq.report.data import sensitivity_data, threshold_points
from rayq.report.html import report_html

logger = logging.getLogger(__name__)

SENSITIVITY_PNG = "sensitivity.png"
THRESHOLDS_PNG = "thresholds.png"
REPORT_HTML = "report.html"
PICTURES_EXTRA = "pictures"
INSTALL_MATPLOTLIB = (f"install it with `pip install 'rayq[{PICTURES_EXTRA}]'` "
                      "(or `pip install matplotlib`)")


def run_title(source: dict | None) -> str:
    """Return the page title: the model source's name, never the location, so that a run's bytes
    are the same wherever it is written."""
    if not source:
        return "rayq run"
    name = source.get("package") or source.get("factory") or source.get("path") or ""
    if source.get("kind") == "huggingface":
        name = os.path.basename(name.rstrip("/"))
    return f"rayq run: {name}" if name else "rayq run"


def png_files(sensitivity: pa.Table, plan: pa.Table, thresholds: pa.Table) -> dict[str, bytes]:
    """Return both PNG pictures by file name; raises ImportError without matplotlib."""
    from rayq.report import pictures

    data = sensitivity_data(sensitivity, plan, thresholds)
    chosen = f" (threshold {data.threshold:g})" if data.threshold is not None else ""
    return {
        SENSITIVITY_PNG: pictures.sensitivity_png(data, f"Per-layer sensitivity{chosen}"),
        THRESHOLDS_PNG: pictures.thresholds_png(threshold_points(thresholds),
                                                "Model size against end-to-end error"),
    }


def picture_files(sensitivity: pa.Table, plan: pa.Table, thresholds: pa.Table,
                  title: str = "rayq run") -> dict[str, bytes]:
    """Return the pictures of a run by file name: the page always, the PNGs where matplotlib is.

    A missing matplotlib is logged as a WARNING that names the skipped files and how to get them.
    """
    files = {REPORT_HTML: report_html(sensitivity, plan, thresholds, title).encode()}
    try:
        files.update(png_files(sensitivity, plan, thresholds))
    except ImportError as exc:
        if not (exc.name or "").startswith("matplotlib"):
            raise
        logger.warning("matplotlib is not installed, so %s and %s were skipped; %s, then draw "
                       "them for this run with `rayq report LOCATION --pictures FOLDER`",
                       SENSITIVITY_PNG, THRESHOLDS_PNG, INSTALL_MATPLOTLIB)
    return files
