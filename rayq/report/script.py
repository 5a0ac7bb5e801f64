"""The page's inline stylesheet and script: hover details, search by layer name and zoom.

The script reads the layer and threshold rows from the JSON block `report-data` in the page.
"""

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
.controls { display: flex; gap: .5em; align-items: center; margin: .5em 0; flex-wrap: wrap; }
.controls input { width: 22em; padding: .2em .4em; }
.chart { overflow-x: auto; border: 1px solid #ddd; background: #fff; }
#sensitivity-chart { display: block; }
svg text { font-size: 10px; fill: #333; }
svg .axis { stroke: #444; } svg .grid { stroke: #ddd; }
svg .threshold { stroke: #000; stroke-dasharray: 6 4; stroke-width: 1.3; }
svg .threshold-label { font-weight: bold; }
svg .layer .band { cursor: pointer; }
svg .layer.hover .band { fill-opacity: .45; }
svg .layer.match .band { fill: #f2c94c; fill-opacity: .7; }
svg .layer.match .name { font-weight: bold; fill: #000; }
svg .layer .name.hidden { display: none; }
svg .ladder { fill: none; stroke: #4c72b0; stroke-width: 1.5; }
svg .point { fill: #4c72b0; cursor: pointer; }
svg .point.chosen { fill: #dd8452; stroke: #000; stroke-width: 1.2; }
svg .point-label { font-size: 9px; fill: #555; }
.legend span { display: inline-block; margin-right: 1em; }
.legend i { display: inline-block; width: .9em; height: .9em; margin-right: .3em;
  vertical-align: middle; }
#tooltip { position: fixed; pointer-events: none; background: #fffbe6; border: 1px solid #999;
  padding: .4em .6em; font-size: 12px; max-width: 32em; display: none; z-index: 10; }
table { border-collapse: collapse; font-size: 12px; margin-top: .4em; }
th, td { border: 1px solid #ddd; padding: .15em .5em; text-align: right; }
th { background: #f3f3f3; } td.text { text-align: left; }
tr.chosen td { font-weight: bold; background: #fff3e0; }
tr.filtered { display: none; }
"""

SCRIPT = """
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var chart = document.getElementById("sensitivity-chart");
  var tooltip = document.getElementById("tooltip");
  var zoom = 1;

  function formatValue(value) {
    if (value === null || value === undefined) { return "-"; }
    if (typeof value === "number") { return Number(value.toPrecision(4)).toString(); }
    return String(value);
  }

  function showTooltip(event, lines) {
    tooltip.textContent = "";
    lines.forEach(function (line, index) {
      var row = document.createElement("div");
      row.textContent = line;
      if (index === 0) { row.style.fontWeight = "bold"; }
      tooltip.appendChild(row);
    });
    tooltip.style.left = (event.clientX + 14) + "px";
    tooltip.style.top = (event.clientY + 14) + "px";
    tooltip.style.display = "block";
  }

  function layerLines(layer) {
    var lines = [layer.name, layer.module_type + ", " + layer.parameter_count + " parameters",
                 "plan: " + layer.scheme + " (" + layer.reason + ")"];
    data.schemes.forEach(function (scheme) {
      lines.push(data.score_label + " " + scheme + ": " + formatValue(layer.qs[scheme]));
    });
    return lines;
  }

  function thresholdLines(row) {
    return ["threshold " + formatValue(row.threshold) + (row.chosen ? " (chosen)" : ""),
            "size " + formatValue(row.model_bytes / 1e6) + " MB, ratio " +
              formatValue(row.compression_ratio) + "x",
            "relative error " + formatValue(row.relative_error) + ", cosine mean " +
              formatValue(row.cosine_mean)];
  }

  chart.querySelectorAll("g.layer").forEach(function (group) {
    var layer = data.layers[Number(group.dataset.i)];
    group.addEventListener("mousemove", function (event) {
      group.classList.add("hover");
      showTooltip(event, layerLines(layer));
    });
    group.addEventListener("mouseleave", function () {
      group.classList.remove("hover");
      tooltip.style.display = "none";
    });
  });
  document.querySelectorAll("#thresholds-chart .point").forEach(function (point) {
    var row = data.thresholds[Number(point.dataset.row)];
    point.addEventListener("mousemove", function (event) { showTooltip(event, thresholdLines(row)); });
    point.addEventListener("mouseleave", function () { tooltip.style.display = "none"; });
  });

  // Hide names that would overlap at the current column width; names that match stay.
  function thinLabels() {
    var step = Math.max(1, Math.ceil(11 / columnWidth()));
    chart.querySelectorAll("g.layer").forEach(function (group) {
      var keep = Number(group.dataset.i) % step === 0 || group.classList.contains("match");
      group.querySelector(".name").classList.toggle("hidden", !keep);
    });
  }

  // At zoom 1 the layers fill the window's width, within limits that keep markers apart.
  function fitColumn() {
    var room = chart.parentElement.clientWidth - 2 - data.margin_left - data.margin_right;
    return Math.min(Math.max(room / data.layers.length, 2), 40);
  }

  function columnWidth() { return fitColumn() * zoom; }

  function applyZoom() {
    var column = columnWidth();
    var rightEdge = data.margin_left + column * data.layers.length;
    chart.querySelectorAll("g.layer").forEach(function (group) {
      var x = data.margin_left + column * (Number(group.dataset.i) + 0.5);
      group.setAttribute("transform", "translate(" + x.toFixed(1) + ",0)");
      var band = group.querySelector(".band");
      band.setAttribute("x", (-column / 2).toFixed(2));
      band.setAttribute("width", column.toFixed(2));
    });
    chart.querySelectorAll("line.span").forEach(function (line) {
      line.setAttribute("x2", rightEdge.toFixed(1));
    });
    chart.setAttribute("width", String(Math.ceil(rightEdge + data.margin_right)));
    document.getElementById("zoom-level").textContent = Math.round(zoom * 100) + "%";
    thinLabels();
  }

  document.getElementById("zoom-in").addEventListener("click", function () {
    zoom = Math.min(zoom * 2, 64); applyZoom();
  });
  document.getElementById("zoom-out").addEventListener("click", function () {
    zoom = Math.max(zoom / 2, 1); applyZoom();
  });
  document.getElementById("zoom-fit").addEventListener("click", function () {
    zoom = 1; applyZoom();
  });
  chart.parentElement.addEventListener("wheel", function (event) {
    if (!event.ctrlKey) { return; }
    event.preventDefault();
    zoom = event.deltaY < 0 ? Math.min(zoom * 1.25, 64) : Math.max(zoom / 1.25, 1);
    applyZoom();
  }, { passive: false });

  // Search: a case-insensitive substring of the layer name marks the chart and filters tables.
  var search = document.getElementById("layer-search");
  function applySearch() {
    var text = search.value.trim().toLowerCase();
    var matches = 0;
    var first = null;
    chart.querySelectorAll("g.layer").forEach(function (group) {
      var name = data.layers[Number(group.dataset.i)].name.toLowerCase();
      var hit = text !== "" && name.indexOf(text) !== -1;
      group.classList.toggle("match", hit);
      if (hit) { matches += 1; if (first === null) { first = group; } }
    });
    document.querySelectorAll("tr[data-layer]").forEach(function (row) {
      var hidden = text !== "" && row.dataset.layer.toLowerCase().indexOf(text) === -1;
      row.classList.toggle("filtered", hidden);
    });
    document.getElementById("search-count").textContent =
      text === "" ? "" : matches + " of " + data.layers.length + " layers match";
    thinLabels();
    if (first !== null) {
      var box = first.getBoundingClientRect();
      var frame = chart.parentElement.getBoundingClientRect();
      chart.parentElement.scrollLeft += box.left - frame.left - frame.width / 3;
    }
  }
  search.addEventListener("input", applySearch);
  window.addEventListener("resize", applyZoom);
  applyZoom();
})();
"""
