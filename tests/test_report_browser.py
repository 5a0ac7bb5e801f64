"""The report page in headless Chromium: no console errors, no network requests, working controls.

Chromium comes from Debian's `chromium` package, installed by `.ci/install-browser` (CI runs it
before the tests). Without it these tests skip, unless RAYQ_REQUIRE_BROWSER=1 (set by `.ci/run`)
makes a missing browser a failure. Screenshots are kept in tests/artifacts/ for people to look at.
"""

from __future__ import annotations

import os

import pytest
import torch
from browser import Chromium, find_chromium
from conftest import ROOT
from test_report import BLOCK_NAMES, Blocks, synthetic_tables

import rayq
from rayq.report import REPORT_HTML
from rayq.report.html import report_html

ARTIFACTS = os.path.join(ROOT, "tests", "artifacts")


@pytest.fixture(scope="module")
def chromium():
    executable = find_chromium()
    if executable is None:
        message = "chromium not found; install it with `bash .ci/install-browser`"
        if os.environ.get("RAYQ_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    with Chromium(executable) as browser:
        yield browser


@pytest.fixture(scope="module")
def run_page(tmp_path_factory):
    """report.html of a real run of a small model, compressed in-process."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(16, 32, generator=generator) for _ in range(10)]
    result = rayq.compress(Blocks().eval(), batches, threshold=0.003, schemes=["int4", "int8"])
    location = tmp_path_factory.mktemp("browser") / "run"
    rayq.save(result, str(location))
    return location / REPORT_HTML, result


def test_console_capture_sees_errors(chromium, tmp_path):
    # Guards the other tests: a broken capture would let every page pass.
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><script>console.error('deliberate');"
                    "undefinedFunction();</script><img src='https://example.invalid/x.png'>"
                    "</body></html>")
    log = chromium.open(page.as_uri())
    assert any("deliberate" in error for error in log.errors), log.errors
    assert any("undefinedFunction" in error for error in log.errors), log.errors
    assert log.requests == ["https://example.invalid/x.png"]


def test_run_page_opens_without_errors(chromium, run_page):
    page, result = run_page
    log = chromium.open(page.as_uri())
    assert log.errors == []
    assert log.requests == []
    layers = chromium.evaluate("document.querySelectorAll('#sensitivity-chart g.layer').length")
    assert layers == len(result.plan.filter(result.plan["quantizable"]))
    os.makedirs(ARTIFACTS, exist_ok=True)
    chromium.screenshot(os.path.join(ARTIFACTS, "report-small-run.png"))


def test_run_page_hover_shows_reason(chromium, run_page):
    page, result = run_page
    assert chromium.open(page.as_uri()).errors == []
    reason = result.plan["reason"][0].as_py()
    text = chromium.evaluate("""(() => {
        const group = document.querySelector('#sensitivity-chart g.layer');
        const box = group.getBoundingClientRect();
        group.dispatchEvent(new MouseEvent('mousemove', {bubbles: true,
            clientX: box.left + 2, clientY: box.top + 20}));
        const tip = document.getElementById('tooltip');
        return tip.style.display + '|' + tip.textContent;
    })()""")
    assert text.startswith("block|")
    assert result.plan["layer"][0].as_py() in text
    assert reason in text


def test_long_page_search_and_zoom(chromium, tmp_path):
    page = tmp_path / "long.html"
    page.write_text(report_html(*synthetic_tables(BLOCK_NAMES), title="300 synthetic layers"))
    log = chromium.open(page.as_uri())
    assert log.errors == []
    assert log.requests == []

    # At fit width 300 columns share about 1200 px, so most names are hidden.
    visible = "document.querySelectorAll('#sensitivity-chart .name:not(.hidden)').length"
    fitted = chromium.evaluate(visible)
    assert 0 < fitted < 150
    chromium.evaluate("document.getElementById('zoom-in').click()")
    chromium.evaluate("document.getElementById('zoom-in').click()")
    assert chromium.evaluate(visible) > fitted
    chromium.evaluate("document.getElementById('zoom-fit').click()")
    assert chromium.evaluate(visible) == fitted

    found = chromium.evaluate("""(() => {
        const box = document.getElementById('layer-search');
        box.value = 'layer.7.ffn';
        box.dispatchEvent(new Event('input'));
        return [document.querySelectorAll('#sensitivity-chart g.layer.match').length,
                document.getElementById('search-count').textContent,
                document.querySelectorAll('#plan-table tr[data-layer]:not(.filtered)').length,
                document.querySelectorAll('#sensitivity-chart g.layer.match .name.hidden').length];
    })()""")
    assert found == [3, "3 of 300 layers match", 3, 0]
    os.makedirs(ARTIFACTS, exist_ok=True)
    chromium.screenshot(os.path.join(ARTIFACTS, "report-300-layers-search.png"))
    assert chromium.page_log(page.as_uri()).errors == []
