"""`rayq.compress_blocks`: compress a decoder model larger than one worker, block by block.

No process loads the whole model. The driver builds the model's skeleton on the meta device and
splits it into blocks that fit the weight cap (rayq.sources.decoder). Each block is one round on
the workers: they load its weights, score their share of the batches through it and keep its
outputs as the next round's inputs. The per-batch QS sums are the same float64 values that
whole-model scoring computes and are reduced in the same global batch order, so the scores are
bitwise equal to whole-model scoring of the same model on the same kind of hardware. Building
streams as well: each block is quantized on a worker and written as one safetensors file.

Limits: candidate schemes int4 and int8 only (w8a8 would need an activation statistics round per
block), local sensitivity only, and no held-out measurement of the compressed model's error,
which would need another pass through every block.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from rayq import progress
from rayq.config import QuantizationSettings, execution_settings, quantization_settings
from rayq.engine import tables, thresholds
from rayq.engine.compress import Scores, split_batches
from rayq.errors import ConfigError
from rayq.planning.plan import Decision, Pin, check_pins, make_plan
from rayq.scoring.batches import Batch
from rayq.scoring.sensitivity import BatchSums, reduce_sums
from rayq.sources.decoder import Block, DecoderModel
from rayq.storage import model_io

logger = logging.getLogger(__name__)

BLOCK_SCHEMES = ("int4", "int8")


@dataclass
class BlockResult:
    """The outcome of `rayq.compress_blocks`: tables, scores and the streamed model files.

    `model_folder` holds `quant_config.json` and one safetensors file per block; it is deleted
    when the result is garbage collected, so save the result with `rayq.save` first.
    """

    threshold: float
    sensitivity: pa.Table
    plan: pa.Table
    thresholds: pa.Table
    settings: QuantizationSettings
    scores: Scores = field(repr=False)
    decisions: list[Decision] = field(repr=False)
    blocks: list[Block] = field(repr=False)
    # One row per block, phase (score or build) and worker: peak memory and activations.
    memory: list[dict[str, Any]] = field(repr=False)
    weight_cap_bytes: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    workers: list[dict[str, Any]] = field(default_factory=list)
    folded: list[tuple[str, str]] = field(default_factory=list)
    _folder: Any = field(default=None, repr=False)

    @property
    def model_folder(self) -> str:
        return self._folder.name


def check_block_settings(settings: QuantizationSettings) -> None:
    """Reject settings that block-by-block scoring does not support, before any work."""
    problems = []
    unsupported = [s for s in settings.schemes if s not in BLOCK_SCHEMES]
    if unsupported:
        problems.append(f"schemes: {', '.join(unsupported)} not supported when scoring block by "
                        f"block; use {' and '.join(BLOCK_SCHEMES)}")
    if settings.sensitivity_mode != "local":
        problems.append("sensitivity_mode: end_to_end is not supported when scoring block by "
                        "block; use local")
    if problems:
        raise ConfigError("invalid settings for block-by-block scoring", problems)


def compress_blocks(folder: str, calibration: Iterable[Batch], *, threshold: float = 0.005,
                    schemes: Iterable[str] = ("int4", "int8"), pins: list[dict] | None = None,
                    workers: int | None = None, address: str | None = None,
                    weight_cap_bytes: int | None = None, worker_cpus: float | None = None,
                    worker_gpus: float | None = None, max_restarts: int = 2,
                    **options) -> BlockResult:
    """Score, plan and build a Hugging Face causal LM folder one block of layers at a time.

    Scoring runs in the calling process unless `workers` or `address` is given. Without
    `weight_cap_bytes`, the cap is the smallest default of the workers (see
    rayq.driver.memory). Further options are fields of `rayq.config.QuantizationSettings`.
    """
    execution = execution_settings(workers=workers, address=address,
                                   weight_cap_bytes=weight_cap_bytes, worker_cpus=worker_cpus,
                                   worker_gpus=worker_gpus, max_restarts=max_restarts)
    settings = quantization_settings(threshold=threshold, schemes=list(schemes),
                                     pins=pins or [], **options)
    check_block_settings(settings)
    decoder = DecoderModel(folder)
    check_pins([Pin(p.pattern, p.scheme) for p in settings.pins],
               [layer.name for layer in decoder.layers], settings.schemes)
    scoring, _, _ = split_batches(list(calibration), None, settings.evaluation_batches)

    backend = _backend(folder, settings, execution)
    try:
        cap = execution.weight_cap_bytes or min(i["default_weight_cap_bytes"] for i in backend.infos)
        blocks = decoder.plan_blocks(cap, settings.schemes)
        logger.info("%.2f GB of weights in %d blocks under a weight cap of %.2f GB per worker",
                    decoder.weight_bytes / 1e9, len(blocks), cap / 1e9)
        timings: dict[str, float] = {}
        started = time.perf_counter()
        partials, memory_rows = score_blocks(backend, blocks, scoring)
        timings["sensitivity_s"] = time.perf_counter() - started

        totals = reduce_sums(partials, decoder.layers)
        scores = Scores(decoder.layers, decoder.kept, totals, {}, list(settings.schemes))
        result = _tables(decoder, scores, settings, blocks, memory_rows, cap)
        started = time.perf_counter()
        result._folder = tempfile.TemporaryDirectory(prefix="rayq-blocks-")
        memory_rows += build_blocks(backend, blocks, result.decisions, result.model_folder)
        timings["build_s"] = time.perf_counter() - started
        result.timings = timings
        result.workers = list(backend.workers)
    finally:
        backend.shutdown()
    return result


def _backend(folder: str, settings: QuantizationSettings, execution):
    from rayq.driver.block_backend import LocalBlockBackend, RayBlockBackend

    if execution.workers is None and execution.address is None:
        return LocalBlockBackend(folder, settings)
    from rayq.driver import cluster

    cluster.connect(execution.address)
    return RayBlockBackend(folder, settings, workers=execution.workers or 1,
                           worker_cpus=execution.worker_cpus, worker_gpus=execution.worker_gpus,
                           max_restarts=execution.max_restarts)


def _shares(batches: list[Batch], count: int) -> list[list[tuple[int, Batch]]]:
    """Split the indexed batches into `count` contiguous shares of near-equal size."""
    indexed = list(enumerate(batches))
    size, extra = divmod(len(indexed), count)
    shares, start = [], 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        if end > start:
            shares.append(indexed[start:end])
        start = end
    return shares


def score_blocks(backend, blocks: list[Block], batches: list[Batch]
                 ) -> tuple[BatchSums, list[dict[str, Any]]]:
    """Run every block in order over the shares; return the per-batch sums and memory rows."""
    states = [backend.put(share) for share in _shares(batches, len(backend.infos))]
    partials: BatchSums = {}
    rows: list[dict[str, Any]] = []
    with progress.phase("blocks", len(blocks), unit="blocks") as advance:
        for block in blocks:
            started = time.perf_counter()
            results = backend.score_block(block, states)
            states = [output for _, output in results]
            for report, _ in results:
                for index, sums in report["partials"].items():
                    partials.setdefault(index, {}).update(sums)
                rows.append(_memory_row(block, "score", report))
            _log_block(block, len(blocks), time.perf_counter() - started, rows[-len(results):])
            advance(1)
    return partials, rows


def _memory_row(block: Block, phase: str, report: dict) -> dict[str, Any]:
    activations = sum(report.get(k, 0) for k in ("input_bytes", "output_bytes",
                                                  "layer_output_bytes"))
    return {"block": block.index, "kind": block.kind, "phase": phase, "worker": report["slot"],
            "weight_bytes": block.weight_bytes, "resident_bytes": block.resident_bytes,
            "peak_rss_bytes": report["peak_rss_bytes"],
            "baseline_rss_bytes": report["baseline_rss_bytes"], "activation_bytes": activations}


def _log_block(block: Block, total: int, seconds: float, rows: list[dict]) -> None:
    peaks = ", ".join(f"worker {r['worker']} {r['peak_rss_bytes'] / 1e6:.0f} MB" for r in rows)
    logger.info("%s of %d scored in %.1f s; peak memory %s", block.describe(), total, seconds,
                peaks)


def _tables(decoder: DecoderModel, scores: Scores, settings: QuantizationSettings,
            blocks: list[Block], memory_rows: list[dict], cap: int) -> BlockResult:
    layer_scores = scores.layer_scores()
    pins = [Pin(p.pattern, p.scheme) for p in settings.pins]
    sizes = {layer.name: tables.layer_bytes(decoder.model, layer) for layer in scores.layers}
    float_bytes = decoder.weight_bytes

    def plan_for(value: float) -> list[Decision]:
        return make_plan(layer_scores, scores.schemes, value, pins)

    def bytes_for(candidate: list[Decision]) -> int:
        return tables.model_bytes(float_bytes, scores.layers, candidate, sizes)

    decisions = plan_for(settings.threshold)
    # NOTE: no held-out error is measured, so the error columns of the ladder stay empty.
    rows = thresholds.evaluate_ladder(thresholds.ladder_with(settings.threshold), plan_for,
                                      bytes_for, None)
    return BlockResult(
        threshold=settings.threshold,
        sensitivity=tables.sensitivity_table(scores.layers, scores.totals, scores.schemes,
                                             sizes, {}),
        plan=tables.plan_table(scores.layers, scores.kept, decisions, sizes, scores.qs_lookup()),
        thresholds=thresholds.thresholds_table(settings.threshold, rows, float_bytes, True),
        settings=settings, scores=scores, decisions=decisions, blocks=blocks,
        memory=memory_rows, weight_cap_bytes=cap)


def block_file_name(block: Block, total: int) -> str:
    return f"model-{block.index + 1:05d}-of-{total:05d}.safetensors"


def build_blocks(backend, blocks: list[Block], decisions: list[Decision], folder: str
                 ) -> list[dict[str, Any]]:
    """Quantize and write each block as it arrives, then the quantization config of all."""
    schemes = {d.layer: d.scheme for d in decisions}
    entries: dict[int, list[dict]] = {}
    rows: list[dict[str, Any]] = []

    def write(block: Block, report: dict) -> None:
        with open(os.path.join(folder, block_file_name(block, len(blocks))), "wb") as handle:
            handle.write(report["data"])
        entries[block.index] = report["entries"]
        rows.append(_memory_row(block, "build", report))
        logger.info("%s written; peak memory of worker %d %.0f MB", block.describe(),
                    report["slot"], report["peak_rss_bytes"] / 1e6)

    with progress.phase("building", len(blocks), unit="blocks") as advance:
        def write_and_advance(block: Block, report: dict) -> None:
            write(block, report)
            advance(1)

        backend.build_blocks(blocks, schemes, write_and_advance)
    _write_config(folder, blocks, entries)
    return rows


def _write_config(folder: str, blocks: list[Block], entries: dict[int, list[dict]]) -> None:
    """Join the blocks' config entries, numbering shared-tensor ids across the whole model."""
    weights = []
    for block in blocks:
        offset = len(weights)
        for entry in entries[block.index]:
            weights.append({**entry, "tensor_id": entry["tensor_id"] + offset})
    config = {"format_version": model_io.FORMAT_VERSION, "source": None, "folded": [],
              "weights": weights, "input_quantizers": [],
              "weight_files": [block_file_name(b, len(blocks)) for b in blocks]}
    with open(os.path.join(folder, model_io.CONFIG_FILE), "w") as handle:
        json.dump(config, handle, indent=2)
