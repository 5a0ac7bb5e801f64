"""Colors and markers shared by the PNG pictures and the HTML page, so both read the same."""

from __future__ import annotations

from rayq.quant.schemes import FLOAT

SCHEME_COLORS = {"int4": "#c44e52", "w8a8": "#8172b3", "int8": "#4c72b0", FLOAT: "#8c8c8c"}
SCHEME_MARKERS = {"int4": "v", "w8a8": "s", "int8": "o"}
OTHER_COLOR = "#555555"


def scheme_color(scheme: str) -> str:
    return SCHEME_COLORS.get(scheme, OTHER_COLOR)
