"""The benchmark harness runs on a tiny model and writes every figure; the figures are not checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow

FIGURES = {"qs_cost_ratio_synthetic", "qs_extra_scheme_ratio_synthetic", "float_pass_s_synthetic",
           "naive_speedup", "naive_speedup_target", "naive_rank_correlation", "replan_fraction",
           "size_ratio_error", "scaling_2_workers", "ray_overhead_s", "block_cost_ratio",
           "block_peak_rss_bytes", "block_peak_rss_target_bytes", "block_weight_cap_bytes",
           "block_count"}


def test_bench_quick_writes_every_figure(tmp_path):
    completed = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--quick",
                                "--output", str(tmp_path)], capture_output=True, text=True,
                               cwd=ROOT, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    payload = json.loads((tmp_path / "results.json").read_text())
    assert set(payload["figures"]) == FIGURES
    assert payload["machine"]["cpu_count"] == os.cpu_count()
    assert all(payload["raw_s"].values())
    page = (tmp_path / "RESULTS.md").read_text()
    for figure in FIGURES:
        assert figure in page
