"""The benchmark harness runs on tiny settings and writes every figure; the figures are not checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow

FIGURES = {"peak_rss_ratio", "peak_rss_added_ratio", "replan_fraction", "size_ratio_error", "scaling_2_workers",
           "ray_overhead_s", "fidelity_minilm", "block_cost_ratio", "block_peak_rss_bytes",
           "block_peak_rss_target_bytes", "block_weight_cap_bytes", "block_count"}
PER_MODEL = {"qs_cost_ratio", "qs_extra_scheme_ratio", "qs_weight_quantization_share",
             "float_pass_s", "naive_speedup", "naive_speedup_target", "naive_rank_correlation"}
# float; rayq at 3 thresholds, with int8 candidates only and with per-position QS; 5 peers
FIDELITY_ROWS = 11
ROW_KEYS = {"model_bytes", "mean_cosine", "min_cosine", "nn_agreement", "retrieval_top1"}


def test_bench_quick_writes_every_figure(tmp_path):
    completed = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--quick",
                                "--output", str(tmp_path)], capture_output=True, text=True,
                               cwd=ROOT, timeout=600, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    payload = json.loads((tmp_path / "results.json").read_text())
    expected = FIGURES | {f"{k}_{m}" for k in PER_MODEL for m in ("synthetic", "minilm")}
    assert set(payload["figures"]) == expected
    assert payload["machine"]["cpu_count"] == os.cpu_count()
    assert payload["status"].startswith("NOT FINAL")
    assert all(payload["raw_s"].values())
    assert set(payload["figures"]["ray_overhead_s"]) == {
        "total", "startup", "per_batch"}

    rows = payload["figures"]["fidelity_minilm"]
    assert len(rows) == FIDELITY_ROWS
    # Every row has either all its figures or the error that compressor raised.
    for row in rows:
        assert "error" in row or ROW_KEYS <= set(row), row
    # The float model against itself: unit vectors whose float32 dot product rounds near 1.
    assert rows[0]["method"] == "float32"
    assert rows[0]["mean_cosine"] == pytest.approx(1.0, abs=1e-6)

    page = (tmp_path / "RESULTS.md").read_text()
    for figure in expected - {"fidelity_minilm"}:
        assert figure in page
    for row in rows:
        assert row["method"] in page
