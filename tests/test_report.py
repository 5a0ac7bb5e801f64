"""A run's pictures: the PNGs, the HTML page, and the page in headless Chromium.

Most tests build tables with the run schemas directly, such as a model of 300 layers, so they
need neither Ray nor a model. One small model is compressed in-process for the files of a real run.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import os
import struct
import subprocess
import sys
from html.parser import HTMLParser

import pyarrow as pa
import pytest
import torch
from conftest import ROOT
from torch import nn

import rayq
from rayq.cli.main import main
from rayq.engine.tables import PLAN_SCHEMA, SENSITIVITY_SCHEMA
from rayq.engine.thresholds import LADDER, THRESHOLDS_SCHEMA
from rayq.errors import DataError
from rayq.report import REPORT_HTML, SENSITIVITY_PNG, THRESHOLDS_PNG, picture_files
from rayq.report.data import axis_labels, sensitivity_data
from rayq.report.html import report_html
from rayq.report.pictures import fleet_png, sensitivity_png, thresholds_png
from rayq.storage.run import MANIFEST, open_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# Synthetic tables with the run schemas.

def synthetic_tables(names: list[str], threshold: float = 0.005) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Sensitivity, plan and threshold tables for layers `names`, with QS spread over 1e-6..1."""
    sensitivity, plan = [], []
    for i, name in enumerate(names):
        qs = {"int4": 10 ** (-4 + 3 * math.sin(i)), "int8": 10 ** (-6 + 2 * math.sin(i))}
        for scheme, value in qs.items():
            sensitivity.append({"layer": name, "module_type": "Linear", "scheme": scheme,
                                "parameter_count": 4096, "calls": 10, "qs": value,
                                "bytes_before": 16384, "bytes_after": 2048, "fits": True,
                                "nonfinite_inputs": 0, "nonfinite_outputs": 0})
        scheme = next((s for s in ("int4", "int8") if qs[s] <= threshold), "float")
        plan.append({"layer": name, "module_type": "Linear", "scheme": scheme,
                     "reason": f"QS {qs.get(scheme, qs['int8']):.3g} vs threshold {threshold:g}",
                     "qs": qs.get(scheme), "parameter_count": 4096, "bytes_before": 16384,
                     "bytes_after": 2048, "quantizable": True})
    rows = []
    for index, value in enumerate(sorted(set(LADDER) | {threshold})):
        rows.append({"threshold": value, "chosen": value == threshold, "layers_int4": index,
                     "layers_w8a8": 0, "layers_int8": len(names) - index, "layers_float": 0,
                     "model_bytes": 4_000_000 - 100_000 * index, "compression_ratio": 1 + index / 4,
                     "relative_error": 0.001 * index ** 2, "cosine_mean": 1 - 1e-4 * index,
                     "cosine_min": 1 - 2e-4 * index, "in_sample": False})
    return (pa.Table.from_pylist(sensitivity, schema=SENSITIVITY_SCHEMA),
            pa.Table.from_pylist(plan, schema=PLAN_SCHEMA),
            pa.Table.from_pylist(rows, schema=THRESHOLDS_SCHEMA))


BLOCK_NAMES = [f"encoder.layer.{block}.{part}" for block in range(30)
               for part in ("attention.q", "attention.k", "attention.v", "attention.out",
                            "ffn.up", "ffn.gate", "ffn.down", "norm.a", "norm.b", "adapter")]
FLAT_NAMES = [f"dense_{i}" for i in range(300)]


def png_size(data: bytes) -> tuple[int, int]:
    """Return (width, height) from the PNG header, after checking the signature."""
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_valid_png(data: bytes, min_width: int = 400, max_width: int = 2000) -> None:
    from PIL import Image

    width, height = png_size(data)
    assert min_width <= width <= max_width, (width, height)
    assert 250 <= height <= 1500, (width, height)
    # Sizes: a blank canvas compresses under 10 kB, and the README copies must stay under 200 kB.
    assert 10_000 < len(data) < 200_000, len(data)
    image = Image.open(io.BytesIO(data))
    image.verify()  # decodes every chunk and checks the CRCs
    assert image.format == "PNG"


# Axis labels on long layer lists.

def test_axis_labels_name_every_short_layer():
    names = FLAT_NAMES[:20]
    assert [label.text for label in axis_labels(names)] == names


def test_axis_labels_group_blocks():
    labels = axis_labels(BLOCK_NAMES)
    assert [label.text for label in labels] == [f"encoder.layer.{b}" for b in range(30)]
    assert [label.position for label in labels] == list(range(0, 300, 10))
    assert all(label.group_start for label in labels)


def test_axis_labels_thin_flat_names():
    labels = axis_labels(FLAT_NAMES)
    positions = [label.position for label in labels]
    assert 10 <= len(labels) <= 48
    assert positions[0] == 0
    steps = {b - a for a, b in itertools.pairwise(positions)}
    assert steps == {7}  # ceil(300 / 48)
    assert all(label.text == FLAT_NAMES[label.position] for label in labels)


def test_label_rows_stack_close_points():
    from rayq.report.data import label_rows

    assert label_rows([(100, 50), (104, 52), (300, 50), (106, 51)]) == [0, 1, 0, 2]
    assert label_rows([(100, 50), (100, 200)]) == [0, 0]


# The PNG pictures.

@pytest.mark.parametrize("names", [BLOCK_NAMES, FLAT_NAMES, FLAT_NAMES[:12]],
                         ids=["300-blocks", "300-flat", "12-layers"])
def test_sensitivity_png_is_valid(names):
    sensitivity, plan, thresholds = synthetic_tables(names)
    data = sensitivity_png(sensitivity_data(sensitivity, plan, thresholds))
    assert_valid_png(data)


def test_sensitivity_png_draws_zero_inf_and_missing_scores():
    sensitivity, plan, thresholds = synthetic_tables(FLAT_NAMES[:6])
    qs = sensitivity["qs"].to_pylist()
    qs[0], qs[1], qs[2], qs[3] = 0.0, math.inf, None, float("nan")
    sensitivity = sensitivity.set_column(sensitivity.schema.get_field_index("qs"), "qs",
                                         pa.array(qs, pa.float64()))
    assert_valid_png(sensitivity_png(sensitivity_data(sensitivity, plan, thresholds)))


def test_threshold_zero_sits_on_bottom_edge():
    tables = synthetic_tables(FLAT_NAMES[:12], threshold=0.0)
    assert_valid_png(sensitivity_png(sensitivity_data(*tables)))
    assert "threshold 0 (bottom edge)" in report_html(*tables)


def test_pictures_of_model_without_layers():
    files = picture_files(*synthetic_tables([]))
    width, height = png_size(files[SENSITIVITY_PNG])
    assert width > 300 and height > 200
    assert "0 quantizable layers" in files[REPORT_HTML].decode()


def test_thresholds_png_is_valid():
    from rayq.report.data import threshold_points

    _, _, thresholds = synthetic_tables(FLAT_NAMES[:12])
    assert_valid_png(thresholds_png(threshold_points(thresholds)))


def test_thresholds_png_without_measured_errors():
    from rayq.report.data import threshold_points

    _, _, thresholds = synthetic_tables(FLAT_NAMES[:12])
    column = thresholds.schema.get_field_index("relative_error")
    unmeasured = thresholds.set_column(column, "relative_error",
                                       pa.nulls(len(thresholds), pa.float64()))
    data = thresholds_png(threshold_points(unmeasured))
    width, height = png_size(data)
    assert width > 300 and height > 200


def test_fleet_png_one_point_per_model():
    models = pa.table({"model": ["minilm", "resnet18", "broken"],
                       "compression_ratio": [3.9, 3.6, None],
                       "relative_error": [0.04, 0.01, None]})
    assert_valid_png(fleet_png(models))


def test_fleet_png_rejects_missing_columns():
    with pytest.raises(DataError, match="compression_ratio"):
        fleet_png(pa.table({"model": ["minilm"], "relative_error": [0.1]}))


# The HTML page.

class PageParser(HTMLParser):
    """Collects table rows by table id, the external references and the embedded data."""

    def __init__(self):
        super().__init__()
        self.rows: dict[str, list[list[str]]] = {}
        self.table = None
        self.cell: list[str] | None = None
        self.external: list[str] = []
        self.script_id = None
        self.data_text = ""

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        for name in ("src", "href"):
            if name in attributes:
                self.external.append(attributes[name])
        if tag == "link":
            self.external.append(str(attributes))
        if tag == "table":
            self.table = attributes["id"]
            self.rows[self.table] = []
        elif tag == "tr" and self.table:
            self.rows[self.table].append([])
        elif tag == "td":
            self.cell = []
        elif tag == "script":
            self.script_id = attributes.get("id")

    def handle_endtag(self, tag):
        if tag == "td":
            self.rows[self.table][-1].append("".join(self.cell))
            self.cell = None
        elif tag == "table":
            self.table = None
        elif tag == "script":
            self.script_id = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)
        if self.script_id == "report-data":
            self.data_text += data


def parse_page(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    return parser


def test_page_holds_every_layer_and_threshold():
    sensitivity, plan, thresholds = synthetic_tables(BLOCK_NAMES)
    parser = parse_page(report_html(sensitivity, plan, thresholds))

    plan_rows = [row for row in parser.rows["plan-table"] if row]
    assert [row[0] for row in plan_rows] == plan["layer"].to_pylist()
    assert [row[2] for row in plan_rows] == plan["scheme"].to_pylist()
    sensitivity_rows = [row for row in parser.rows["sensitivity-table"] if row]
    assert [(row[0], row[2]) for row in sensitivity_rows] == \
        list(zip(sensitivity["layer"].to_pylist(), sensitivity["scheme"].to_pylist()))
    threshold_rows = [row for row in parser.rows["thresholds-table"] if row]
    assert [float(row[1]) for row in threshold_rows] == thresholds["threshold"].to_pylist()
    assert [row[0] for row in threshold_rows].count("yes") == 1

    data = json.loads(parser.data_text)
    assert [layer["name"] for layer in data["layers"]] == BLOCK_NAMES
    assert len(data["thresholds"]) == len(thresholds)


def test_page_needs_no_network():
    page = report_html(*synthetic_tables(FLAT_NAMES[:12]))
    parser = parse_page(page)
    assert parser.external == []
    assert "<script src" not in page
    assert "@import" not in page
    assert "url(" not in page


def test_page_escapes_layer_names():
    names = ["blocks.0.</script><b>x", 'blocks.1."quoted"&amp']
    sensitivity, plan, thresholds = synthetic_tables(names)
    page = report_html(sensitivity, plan, thresholds)
    assert "</script><b>" not in page
    parser = parse_page(page)
    assert [row[0] for row in parser.rows["plan-table"] if row] == names
    assert [layer["name"] for layer in json.loads(parser.data_text)["layers"]] == names


def test_page_carries_inf_and_missing_scores():
    sensitivity, plan, thresholds = synthetic_tables(FLAT_NAMES[:3])
    qs = sensitivity["qs"].to_pylist()
    qs[0], qs[1] = math.inf, None
    sensitivity = sensitivity.set_column(sensitivity.schema.get_field_index("qs"), "qs",
                                         pa.array(qs, pa.float64()))
    data = json.loads(parse_page(report_html(sensitivity, plan, thresholds)).data_text)
    assert data["layers"][0]["qs"]["int4"] == "inf"
    assert data["layers"][0]["qs"]["int8"] is None


# A real run, compressed in-process.

class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
                                    for _ in range(3))
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


@pytest.fixture(scope="module")
def result():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(16, 32, generator=generator) for _ in range(10)]
    return rayq.compress(Blocks().eval(), batches, threshold=0.003, schemes=["int4", "int8"])


@pytest.fixture(scope="module")
def saved_run(result, tmp_path_factory):
    location = tmp_path_factory.mktemp("report") / "run"
    rayq.save(result, str(location))
    return location


def test_run_writes_pictures_in_manifest(saved_run):
    manifest = json.loads((saved_run / MANIFEST).read_text())
    for name in (SENSITIVITY_PNG, THRESHOLDS_PNG, REPORT_HTML):
        data = (saved_run / name).read_bytes()
        assert manifest["files"][name]["size_bytes"] == len(data), name
        assert manifest["files"][name]["sha256"] == hashlib.sha256(data).hexdigest(), name
    assert_valid_png((saved_run / SENSITIVITY_PNG).read_bytes())
    assert_valid_png((saved_run / THRESHOLDS_PNG).read_bytes())
    open_run(str(saved_run)).verify()


def test_run_page_holds_run_tables(saved_run, result):
    parser = parse_page((saved_run / REPORT_HTML).read_text())
    layers = [row[0] for row in parser.rows["plan-table"] if row]
    assert layers == result.plan["layer"].to_pylist()
    assert "blocks.2.2" in layers
    thresholds = [float(row[1]) for row in parser.rows["thresholds-table"] if row]
    assert thresholds == result.thresholds["threshold"].to_pylist()


def test_report_html_flag_rewrites_page(saved_run, tmp_path, capsys):
    page = tmp_path / "out" / "page.html"
    assert main(["report", str(saved_run), "--html", str(page)]) == 0
    assert f"wrote {page}" in capsys.readouterr().out
    # The page is drawn from the stored tables alone, so it equals the one the run wrote.
    assert page.read_bytes() == (saved_run / REPORT_HTML).read_bytes()


def test_report_pictures_flag_draws_pngs(saved_run, tmp_path, capsys):
    folder = tmp_path / "pictures"
    assert main(["report", str(saved_run), "--pictures", str(folder)]) == 0
    for name in (SENSITIVITY_PNG, THRESHOLDS_PNG):
        assert (folder / name).read_bytes() == (saved_run / name).read_bytes(), name


def test_report_html_of_s3_run(result, s3_bucket, tmp_path, capsys):
    uri = f"s3://{s3_bucket}/runs/blocks"
    rayq.save(result, uri)
    page = tmp_path / "s3-page.html"
    assert main(["report", uri, "--html", str(page)]) == 0
    parser = parse_page(page.read_text())
    assert [row[0] for row in parser.rows["plan-table"] if row] == result.plan["layer"].to_pylist()


def test_report_html_unwritable_path_exits_2(saved_run, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["report", str(saved_run), "--html", str(blocker / "page.html")]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err
    assert "Traceback" not in err


# Without matplotlib: a subprocess where importing it fails.

NO_MATPLOTLIB_SCRIPT = """
import logging, sys
sys.modules["matplotlib"] = None  # any `import matplotlib` now raises ImportError
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
import torch
from torch import nn
import rayq
from rayq.cli.main import main

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
batches = [torch.randn(8, 16) for _ in range(4)]
rayq.save(rayq.compress(model, batches, threshold=0.005), sys.argv[1])
print("report exit code", main(["report", sys.argv[1], "--pictures", sys.argv[2]]))
"""


def test_run_without_matplotlib_skips_pngs(tmp_path):
    location, folder = tmp_path / "run", tmp_path / "pictures"
    process = subprocess.run([sys.executable, "-c", NO_MATPLOTLIB_SCRIPT, str(location),
                              str(folder)], capture_output=True, text=True, cwd=ROOT, timeout=300,
                             check=False)
    assert process.returncode == 0, process.stderr
    written = set(os.listdir(location))
    assert {"sensitivity.parquet", "plan.parquet", "thresholds.parquet", "summary.txt",
            REPORT_HTML, MANIFEST} <= written
    assert SENSITIVITY_PNG not in written
    assert THRESHOLDS_PNG not in written
    listed = set(json.loads((location / MANIFEST).read_text())["files"])
    assert listed == {"model/model.safetensors", "model/quant_config.json", "sensitivity.parquet",
                      "plan.parquet", "thresholds.parquet", "summary.txt", REPORT_HTML}
    assert "WARNING rayq.report" in process.stderr
    assert "sensitivity.png and thresholds.png were skipped" in process.stderr
    assert "pip install 'rayq[pictures]'" in process.stderr
    assert "rayq report LOCATION --pictures FOLDER" in process.stderr
    # Asking for pictures without matplotlib is invalid input, rejected before reading the run.
    assert "report exit code 2" in process.stdout
    assert "--pictures needs matplotlib" in process.stderr
    assert not folder.exists()


def test_picture_files_lists_page_and_pngs():
    files = picture_files(*synthetic_tables(FLAT_NAMES[:5]))
    assert set(files) == {REPORT_HTML, SENSITIVITY_PNG, THRESHOLDS_PNG}


def test_ratio_ticks_keep_apart():
    from rayq.report.pictures import RATIO_TICK_GAP, _ratio_ticks

    # The MiniLM demo's axis: 90.9 MB float, sizes from about 20 to 94 MB.
    limits = (19.5, 94.3)
    ticks = _ratio_ticks(90.9, limits)
    assert ticks[0] == 1
    assert 4 in ticks
    positions = [90.9 / ratio for ratio in ticks]
    gaps = [a - b for a, b in zip(positions, positions[1:])]
    assert min(gaps) >= RATIO_TICK_GAP * (limits[1] - limits[0])
    assert all(limits[0] <= mb <= limits[1] for mb in positions)
