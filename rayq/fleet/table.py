"""The fleet table: one row per model, written as `fleet.parquet` and printed for people."""

from __future__ import annotations

import io
import os

import pyarrow as pa
import pyarrow.parquet as pq

from rayq.fleet.runner import ModelOutcome
from rayq.storage import s3_write
from rayq.storage.location import Location

FLEET_FILE = "fleet.parquet"

FLEET_SCHEMA = pa.schema([
    pa.field("name", pa.string()),
    pa.field("status", pa.string()),  # done, skipped or failed
    pa.field("reason", pa.string()),  # why it ran or was skipped, or the error
    pa.field("duration_s", pa.float64()),
    pa.field("float_bytes", pa.int64()),
    pa.field("model_bytes", pa.int64()),
    pa.field("compression_ratio", pa.float64()),
    pa.field("relative_error", pa.float64()),  # of the chosen plan, end to end, held out
    pa.field("cosine_mean", pa.float64()),
    pa.field("threshold", pa.float64()),
    pa.field("location", pa.string()),
    pa.field("fingerprint", pa.string()),
    pa.field("fleet_owner", pa.string()),
    pa.field("finished_unix_s", pa.float64()),
])


def fleet_table(outcomes: list[ModelOutcome], owner: str, finished_unix_s: float) -> pa.Table:
    rows = []
    for outcome in outcomes:
        row = {name: getattr(outcome, name, None) for name in FLEET_SCHEMA.names}
        row.update(fleet_owner=owner, finished_unix_s=finished_unix_s)
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=FLEET_SCHEMA)


def write_fleet_table(root: Location, table: pa.Table) -> None:
    """Write `fleet.parquet` under the output root, replacing the previous fleet's table."""
    sink = io.BytesIO()
    pq.write_table(table, sink)
    data = sink.getvalue()
    if root.is_local:
        os.makedirs(root.root, exist_ok=True)
        temporary = root.path(f".{FLEET_FILE}.tmp")
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, root.path(FLEET_FILE))
        return
    s3_write.put_file(root, FLEET_FILE, data)


def fleet_text(table: pa.Table) -> str:
    """Format the table for a terminal: one line per model, the reasons below."""
    header = f"{'model':<20} {'status':<8} {'time':>7} {'float':>9} {'compressed':>10} " \
             f"{'ratio':>6} {'rel. error':>10}"
    lines = [header, "-" * len(header)]
    for row in table.to_pylist():
        lines.append(f"{row['name'][:20]:<20} {row['status']:<8} {row['duration_s']:>6.1f}s "
                     f"{_size(row['float_bytes']):>9} {_size(row['model_bytes']):>10} "
                     f"{_number(row['compression_ratio'], '.2f', 'x'):>6} "
                     f"{_number(row['relative_error'], '.2e'):>10}")
    lines.append("")
    for row in table.to_pylist():
        lines.append(f"{row['name']}: {row['status']}: {row['reason']}")
    return "\n".join(lines)


def _size(count: int | None) -> str:
    if count is None:
        return "-"
    if count >= 1e6:
        return f"{count / 1e6:.1f} MB"
    return f"{count / 1e3:.1f} kB" if count >= 1e3 else f"{count} B"


def _number(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"
