"""Plain-text tables for people: the threshold guidance and the plan, as logged and saved."""

from __future__ import annotations

import pyarrow as pa


def _cell(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def render(columns: list[tuple[str, str]], rows: list[dict]) -> str:
    """Render rows as a fixed-width table; `columns` pairs a key with its header."""
    cells = [[header for _, header in columns]]
    for row in rows:
        cells.append([_cell(row.get(key)) for key, _ in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(text.rjust(width) for text, width in zip(line, widths)).rstrip()
             for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def thresholds_text(table: pa.Table) -> str:
    rows = table.to_pylist()
    for row in rows:
        row["mark"] = "<- chosen" if row["chosen"] else ""
        row["size_mb"] = row["model_bytes"] / 1e6
    columns = [("threshold", "threshold"), ("layers_int4", "int4"), ("layers_w8a8", "w8a8"),
               ("layers_int8", "int8"), ("layers_float", "float"), ("size_mb", "size MB"),
               ("compression_ratio", "ratio"), ("relative_error", "rel. error"),
               ("cosine_mean", "cosine mean"), ("cosine_min", "cosine min"), ("mark", "")]
    note = ""
    if rows and rows[0]["in_sample"]:
        note = "\n(errors measured on the calibration batches themselves: in-sample)"
    return render(columns, rows) + note


def plan_text(table: pa.Table) -> str:
    rows = [r for r in table.to_pylist() if r["quantizable"]]
    columns = [("layer", "layer"), ("module_type", "type"), ("scheme", "scheme"), ("qs", "QS"),
               ("reason", "reason")]
    return render(columns, rows)


def summary_text(thresholds: pa.Table, plan: pa.Table, header: str = "") -> str:
    parts = [header] if header else []
    parts += ["Threshold guidance", thresholds_text(thresholds), "", "Plan", plan_text(plan)]
    kept = [r for r in plan.to_pylist() if not r["quantizable"]]
    if kept:
        parts += ["", f"Modules without a quantization rule, kept float: {len(kept)} "
                  f"({', '.join(sorted({r['module_type'] for r in kept}))})"]
    return "\n".join(parts) + "\n"
