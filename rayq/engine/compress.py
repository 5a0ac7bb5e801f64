"""`rayq.compress`: score every layer, plan for a threshold, build and evaluate the model.

The steps are the same whether scoring runs here or on Ray actors. A `ScoringBackend` makes the
passes over the calibration data, and everything else happens in the calling process.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

import pyarrow as pa
import torch
from torch import nn

from rayq import progress
from rayq.config import (ExecutionSettings, QuantizationSettings, execution_settings,
                         quantization_settings)
from rayq.engine import build, tables, thresholds
from rayq.engine.evaluate import Fidelity, FloatOutputs, measure, reference_outputs
from rayq.errors import ConfigError, DataError, ModelError
from rayq.model import folding
from rayq.model.layers import FloatModule, LayerSpec, find_layers
from rayq.planning.plan import Decision, LayerScore, Pin, check_pins, make_plan
from rayq.quant.activations import ActivationParams, Histogram, calibrate
from rayq.quant.schemes import SCHEMES, by_compression
from rayq.scoring.batches import Batch, check_batches
from rayq.scoring.quantized import WeightBank
from rayq.scoring.end_to_end import score_end_to_end
from rayq.scoring.sensitivity import (BatchSums, LayerSums, gather_activation_stats, merge_partials,
                                      qs_value, reduce_sums, score_batches)

logger = logging.getLogger(__name__)


class ScoringBackend(Protocol):
    """Runs the calibration passes; in-process or spread over Ray actors."""

    def activation_stats(self, batches: list[tuple[int, Batch]]) -> dict[str, Histogram]: ...

    def qs_sums(self, batches: list[tuple[int, Batch]],
                activations: dict[str, ActivationParams]) -> BatchSums: ...

    def end_to_end_sums(self, batches: list[tuple[int, Batch]],
                        activations: dict[str, ActivationParams]) -> BatchSums: ...


class InProcessBackend:
    """Scores in the calling process on the prepared (folded, eval-mode) model."""

    def __init__(self, model: nn.Module, layers: list[LayerSpec], settings: QuantizationSettings):
        self.model = model
        self.layers = layers
        self.schemes = by_compression(settings.schemes)
        self.clip_search = settings.clip_search
        self.per_position = settings.qs_normalization == "position"
        self._bank: WeightBank | None = None

    @property
    def bank(self) -> WeightBank:
        if self._bank is None:
            self._bank = WeightBank(self.model, self.layers, self.schemes, self.clip_search)
        return self._bank

    def activation_stats(self, batches):
        with progress.phase("activation stats", len(batches)) as advance:
            return gather_activation_stats(self.model, self.layers, batches, advance)

    def qs_sums(self, batches, activations):
        with progress.phase("qs sums", len(batches)) as advance:
            return score_batches(self.model, self.layers, self.schemes, self.bank, activations,
                                 batches, advance, per_position=self.per_position)

    def end_to_end_sums(self, batches, activations, layer_names: list[str] | None = None):
        layers = self.layers if layer_names is None else [
            layer for layer in self.layers if layer.name in set(layer_names)]
        return score_end_to_end(self.model, layers, self.schemes, self.bank, activations, batches)


@dataclass
class Prepared:
    """The float model as it will be scored and quantized: a folded eval-mode copy."""

    model: nn.Module
    layers: list[LayerSpec]
    kept: list[FloatModule]
    folded: list[tuple[str, str]]


def prepare(model: nn.Module) -> Prepared:
    """Copy the model, switch the copy to eval mode and fold its BatchNorms.

    The caller's model is never modified, so its mode and running statistics stay as they were.
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        logger.info("calibrating a copy of the model in eval mode; the model you passed stays "
                    "in train mode and keeps its running statistics")
    work = copy.deepcopy(model).eval()
    pairs = folding.find_foldable(work)
    folding.fold(work, pairs)
    layers, kept = find_layers(work)
    if not layers:
        logger.warning("the model has no quantizable layer; its plan keeps every module float")
    return Prepared(work, layers, kept, pairs)


def split_batches(batches: list[Batch], evaluation: list[Batch] | None,
                  held_out: int | None) -> tuple[list[Batch], list[Batch], bool]:
    """Return (scoring batches, held-out batches, whether the held-out errors are in-sample)."""
    if not batches:
        raise DataError("the calibration data is empty: it contains no batch. "
                        "Give at least one batch (ten or more to get held-out error figures).")
    if evaluation:
        return batches, evaluation, False
    if held_out is not None:
        count = held_out
    elif len(batches) >= 10:
        count = len(batches) // 10
    else:
        count = 0
    if count <= 0:
        return batches, batches, True
    if count >= len(batches):
        raise DataError(f"evaluation_batches={count} leaves no calibration batch out of "
                        f"{len(batches)}; use fewer held-out batches")
    return batches[:-count], batches[-count:], False


@dataclass
class Scores:
    """Everything re-planning needs: the layers, their reduced QS sums and activation ranges."""

    layers: list[LayerSpec]
    kept: list[FloatModule]
    totals: dict[str, LayerSums]
    activations: dict[str, ActivationParams]
    schemes: list[str]
    mode: str = "local"

    def layer_scores(self) -> list[LayerScore]:
        """Return the scores the plan uses: local QS, or end-to-end QS in end_to_end mode."""
        result = []
        for layer in self.layers:
            sums = self.totals[layer.name]
            if self.mode == "end_to_end":
                qs = {s: qs_value(sums.end_to_end[s], sums.end_to_end_denominator)
                      for s in self.schemes if s in sums.end_to_end}
            else:
                qs = {s: qs_value(sums.numerators[s], sums.denominator)
                      for s in self.schemes if s in sums.numerators}
            result.append(LayerScore(layer.name, layer.module_type, sums.calls, qs, layer.unfit,
                                     sums.nonfinite_inputs, sums.nonfinite_outputs,
                                     tuple(layer.tied_with)))
        return result

    def qs_lookup(self) -> dict[tuple[str, str], float]:
        return {(s.name, scheme): value for s in self.layer_scores() for scheme, value in s.qs.items()}


@dataclass
class CompressResult:
    """The outcome of `rayq.compress`: the compressed module, its tables and what re-planning needs."""

    model: nn.Module
    threshold: float
    sensitivity: pa.Table
    plan: pa.Table
    thresholds: pa.Table
    settings: QuantizationSettings
    scores: Scores = field(repr=False)
    float_model: nn.Module = field(repr=False)
    folded: list[tuple[str, str]] = field(repr=False)
    decisions: list[Decision] = field(repr=False)
    evaluation: list[Batch] = field(repr=False, default_factory=list)
    references: FloatOutputs | list[list[torch.Tensor]] = field(repr=False, default_factory=list)
    in_sample: bool = True
    timings: dict[str, float] = field(default_factory=dict)
    workers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def fidelity(self) -> Fidelity | None:
        chosen = self.thresholds.filter(self.thresholds["chosen"]).to_pylist()
        if not chosen or chosen[0]["relative_error"] is None:
            return None
        row = chosen[0]
        return Fidelity(row["relative_error"], row["cosine_mean"], row["cosine_min"])

    def replan(self, threshold: float, evaluate: bool = False,
               schemes: Iterable[str] | None = None) -> "CompressResult":
        """Plan again at `threshold` from the stored scores, with no scoring pass.

        `schemes` narrows the candidates to some of the scored schemes. The model runs only when
        `evaluate` is true, to measure the new plan on the held-out batches; otherwise the error
        columns are taken from an equal plan of the ladder or left empty.
        """
        update = {"threshold": threshold}
        if schemes is not None:
            update["schemes"] = check_scored_schemes(list(schemes), self.scores.schemes)
        settings = self.settings.model_copy(update=update)
        settings = quantization_settings(**settings.model_dump())
        return finish(self.float_model, self.scores, settings, self.folded, self.evaluation,
                      self.references, self.in_sample, evaluate=evaluate, previous=self)


def compress(model: nn.Module, calibration: Iterable[Batch], *, threshold: float = 0.005,
             schemes: Iterable[str] = ("int4", "int8"), pins: list[dict] | None = None,
             evaluation: Iterable[Batch] | None = None, workers: int | None = None,
             address: str | None = None, source: dict | None = None, backend_factory=None,
             **options) -> CompressResult:
    """Compress `model` by post-training quantization, in the calling process.

    `calibration` yields batches: a tensor (the one positional argument), a tuple of positional
    arguments, or a dict of keyword arguments. Held-out batches come from `evaluation`, else from
    the last tenth of the calibration batches when there are ten or more. Further options are
    the fields of `rayq.config.QuantizationSettings` and `rayq.config.ExecutionSettings`.

    Scoring runs in the calling process unless `workers` or `address` is given; then it runs on
    Ray actors, which load the model from `source` when there is one.
    """
    execution_keys = (set(ExecutionSettings.model_fields) - {"workers", "address"}) | {"fault"}
    execution = {k: options.pop(k) for k in list(options) if k in execution_keys}
    settings = quantization_settings(threshold=threshold, schemes=list(schemes),
                                     pins=pins or [], **options)
    if backend_factory is None and (workers is not None or address is not None):
        backend_factory = _ray_backend_factory(model, source, workers or 1, address, execution)
    batches = list(calibration)
    scoring, held_out, in_sample = split_batches(batches, list(evaluation or []),
                                                 settings.evaluation_batches)
    prepared = prepare(model)
    check_pins([Pin(p.pattern, p.scheme) for p in settings.pins],
               [layer.name for layer in prepared.layers], settings.schemes)
    # Ray workers take seconds to start, so a batch the model cannot run fails here first.
    check_batches(prepared.model, batches, run_first=backend_factory is not None)

    backend = (backend_factory or InProcessBackend)(prepared.model, prepared.layers, settings)
    timings: dict[str, float] = {}
    scores = run_scoring(backend, prepared, settings, scoring, timings)

    started = time.perf_counter()
    references = reference_outputs(prepared.model, held_out)
    result = finish(prepared.model, scores, settings, prepared.folded, held_out, references,
                    in_sample, evaluate=True)
    timings["plan_and_evaluate_s"] = time.perf_counter() - started
    result.timings.update(timings)
    result.workers = list(getattr(backend, "workers", []))
    if hasattr(backend, "shutdown"):
        backend.shutdown()
    return result


def _ray_backend_factory(model: nn.Module, source: dict | None, workers: int, address: str | None,
                         execution: dict):
    from rayq.driver import cluster
    from rayq.driver.backend import RayBackend

    fault = execution.pop("fault", None)  # testing hook, see rayq.driver.worker
    settings = execution_settings(workers=workers, address=address, **execution)
    cluster.connect(address)
    payload = {"source": source} if source else {"module": model}

    def factory(prepared_model, layers, quantization):
        return RayBackend(quantization, payload, workers=workers, worker_cpus=settings.worker_cpus,
                          worker_gpus=settings.worker_gpus, max_restarts=settings.max_restarts,
                          fault=fault)
    return factory


def run_scoring(backend: ScoringBackend, prepared: Prepared, settings: QuantizationSettings,
                scoring: list[Batch], timings: dict[str, float]) -> Scores:
    indexed = list(enumerate(scoring))
    activations: dict[str, ActivationParams] = {}
    if "w8a8" in settings.schemes:
        started = time.perf_counter()
        logger.info("activation statistics: %d batches", len(indexed))
        stats = backend.activation_stats(indexed)
        activations = {name: calibrate(h, settings.activation_method, settings.activation_percentile)
                       for name, h in stats.items()}
        timings["activation_stats_s"] = time.perf_counter() - started
        logger.info("activation statistics done in %.1f s", timings["activation_stats_s"])

    started = time.perf_counter()
    logger.info("sensitivity: %d layers, schemes %s, %d batches", len(prepared.layers),
                ",".join(settings.schemes), len(indexed))
    partials = backend.qs_sums(indexed, activations)
    timings["sensitivity_s"] = time.perf_counter() - started
    logger.info("sensitivity done in %.1f s", timings["sensitivity_s"])

    if settings.sensitivity_mode == "end_to_end":
        started = time.perf_counter()
        logger.info("end-to-end sensitivity: %d layers x %d schemes x %d batches",
                    len(prepared.layers), len(settings.schemes), len(indexed))
        partials = merge_partials(partials, backend.end_to_end_sums(indexed, activations))
        timings["end_to_end_s"] = time.perf_counter() - started
        logger.info("end-to-end sensitivity done in %.1f s", timings["end_to_end_s"])

    totals = reduce_sums(partials, prepared.layers)
    return Scores(prepared.layers, prepared.kept, totals, activations, list(settings.schemes),
                  settings.sensitivity_mode)


def _outputs_of(references: FloatOutputs | list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    return references.get() if isinstance(references, FloatOutputs) else references


def finish(float_model: nn.Module, scores: Scores, settings: QuantizationSettings,
           folded: list[tuple[str, str]], evaluation: list[Batch],
           references: FloatOutputs | list[list[torch.Tensor]], in_sample: bool, evaluate: bool,
           previous: CompressResult | None = None,
           known_thresholds: pa.Table | None = None) -> CompressResult:
    """Plan, build the compressed model and compute the tables from stored scores.

    Plans whose error is already in `known_thresholds` (or `previous.thresholds`) are not
    measured again; with `evaluate`, every other plan runs on the held-out batches.
    """
    layer_scores = scores.layer_scores()
    pins = [Pin(p.pattern, p.scheme) for p in settings.pins]
    sizes = {layer.name: tables.layer_bytes(float_model, layer) for layer in scores.layers}
    float_bytes = tables.state_bytes(float_model)

    candidates = [scheme for scheme in scores.schemes if scheme in settings.schemes]

    def plan_for(threshold: float) -> list[Decision]:
        return make_plan(layer_scores, candidates, threshold, pins)

    def build_for(decisions: list[Decision]) -> nn.Module:
        return build.build_compressed(float_model, scores.layers, decisions, scores.activations,
                                      settings.clip_search)

    decisions = plan_for(settings.threshold)
    model = build_for(decisions)

    def fidelity_for(candidate: list[Decision]) -> Fidelity:
        # The chosen plan's model is already built; other plans are built for the measurement.
        built = model if candidate == decisions else build_for(candidate)
        return measure(built, evaluation, _outputs_of(references))

    def bytes_for(candidate: list[Decision]) -> int:
        return tables.model_bytes(float_bytes, scores.layers, candidate, sizes)

    known_table = known_thresholds
    # A table planned with other candidates holds errors of other plans, so it is not reused.
    if known_table is None and previous is not None and (
            set(previous.settings.schemes) == set(settings.schemes)):
        known_table = previous.thresholds
    known = _known_fidelities(known_table, plan_for)
    ladder = thresholds.ladder_with(settings.threshold)
    started = time.perf_counter()
    rows = thresholds.evaluate_ladder(ladder, plan_for, bytes_for,
                                      fidelity_for if evaluate else None, known)
    if evaluate:
        logger.info("threshold ladder measured on %d held-out batches in %.1f s",
                    len(evaluation), time.perf_counter() - started)

    return CompressResult(
        model=model, threshold=settings.threshold,
        sensitivity=tables.sensitivity_table(scores.layers, scores.totals, scores.schemes, sizes,
                                             scores.activations),
        plan=tables.plan_table(scores.layers, scores.kept, decisions, sizes, scores.qs_lookup()),
        thresholds=thresholds.thresholds_table(settings.threshold, rows, float_bytes, in_sample),
        settings=settings, scores=scores, float_model=float_model, folded=folded,
        decisions=decisions, evaluation=evaluation, references=references, in_sample=in_sample,
        workers=list(previous.workers) if previous else [],
    )


def check_scored_schemes(schemes: list[str], scored: list[str]) -> list[str]:
    """Candidates for a new plan must be among the schemes the stored scores cover."""
    missing = [scheme for scheme in schemes if scheme not in scored]
    if missing or not schemes:
        raise ConfigError(f"schemes {schemes} cannot be planned from these scores, which cover "
                          f"{scored}; choose one or more of those, or compress again with the "
                          "schemes you need")
    return schemes


def _known_fidelities(table: pa.Table | None, plan_for) -> dict[tuple, Fidelity]:
    """Errors already measured for a ladder, keyed by the plan each threshold gives now."""
    known: dict[tuple, Fidelity] = {}
    if table is None:
        return known
    for row in table.to_pylist():
        if row["relative_error"] is None:
            continue
        key = thresholds.plan_key(plan_for(row["threshold"]))
        known[key] = Fidelity(row["relative_error"], row["cosine_mean"], row["cosine_min"])
    return known


__all__ = ["CompressResult", "compress", "SCHEMES"]
