"""Cost figures: one-pass QS against float passes and the naive method, re-planning, size, Ray.

Each function measures the model and batches it gets. It adds figures to `results` and raw
timings to `raw`, and run.py decides the models and the order.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
from torch import nn

import rayq
from rayq.engine.compress import prepare
from rayq.planning.plan import make_plan
from rayq.quant.schemes import SCHEMES, by_compression
from rayq.scoring.batches import call_model, float_tensors
from rayq.scoring.quantized import WeightBank, quantize_weight
from rayq.scoring.sensitivity import reduce_sums, score_batches


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up: first calls pay for allocation and kernel selection
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


class Block(nn.Module):
    """A transformer MLP block: pre-LayerNorm, two Linear layers, residual add."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


def synthetic(blocks: int, width: int) -> nn.Module:
    """Residual blocks with LayerNorm, so every layer's error reaches the output.

    A plain stack of Linear and GELU with default init shrinks its activations layer by layer,
    so the output hardly depends on the first layers and end-to-end errors rank layers by depth.
    Each Linear gets a few input columns scaled up (outlier channels, as trained transformers
    have) by a different factor, so the layers differ in how well int8 fits them.
    """
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(width) for _ in range(blocks)])
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                columns = torch.randperm(module.in_features)[:4]
                module.weight[:, columns] *= float(torch.empty(1).uniform_(1.0, 30.0))
    return model.eval()


def float_pass(model, batches):
    with torch.no_grad():
        for batch in batches:
            call_model(model, batch)


def qs_pass(model, layers, schemes, batches):
    bank = WeightBank(model, layers, by_compression(schemes))
    indexed = list(enumerate(batches))
    return score_batches(model, layers, by_compression(schemes), bank, {}, indexed)


def naive_scores(model, layers, batches):
    """The common method: quantize one layer at a time (int8) and rerun the whole model."""
    references = []
    with torch.no_grad():
        for batch in batches:
            references.append([t.double() for t in _tensors(call_model(model, batch))])
    scores = {}
    for layer in layers:
        module = model.get_submodule(layer.name)
        saved = module.weight.detach().clone()
        q = quantize_weight(module.weight, layer.weights[0].layout, SCHEMES["int8"].weights)
        error = signal = 0.0
        with torch.no_grad():
            module.weight.copy_(q.dequantize())
            for batch, reference in zip(batches, references):
                for out, ref in zip(_tensors(call_model(model, batch)), reference):
                    error += float(((out.double() - ref) ** 2).sum())
                    signal += float((ref ** 2).sum())
            module.weight.copy_(saved)
        scores[layer.name] = error / signal if signal else 0.0
    return scores


def _tensors(output):
    return list(float_tensors(output))


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        for rank, index in enumerate(order):
            result[index] = float(rank)
        return result

    ra, rb = ranks(a), ranks(b)
    mean = (len(a) - 1) / 2
    cov = sum((x - mean) * (y - mean) for x, y in zip(ra, rb))
    var = sum((x - mean) ** 2 for x in ra)
    return cov / var if var else 1.0


def cost_figures(name, model, batches, repeats, results, raw):
    """QS time for one and two schemes over float passes; both include quantizing the weights."""
    prepared = prepare(model)
    layers = prepared.layers
    work = prepared.model
    float_s, raw[f"{name}_float_s"] = median_time(lambda: float_pass(work, batches), repeats)
    one_s, raw[f"{name}_qs_int8_s"] = median_time(lambda: qs_pass(work, layers, ["int8"], batches), repeats)
    two_s, raw[f"{name}_qs_int8_int4_s"] = median_time(
        lambda: qs_pass(work, layers, ["int8", "int4"], batches), repeats)
    bank_s, raw[f"{name}_weight_bank_int8_s"] = median_time(
        lambda: WeightBank(work, layers, by_compression(["int8"])), repeats)
    results[f"qs_cost_ratio_{name}"] = one_s / float_s
    results[f"qs_extra_scheme_ratio_{name}"] = (two_s - one_s) / float_s
    results[f"qs_weight_quantization_share_{name}"] = bank_s / one_s
    results[f"float_pass_s_{name}"] = float_s
    return work, layers, one_s


def naive_figures(name, work, layers, batches, one_s, results, raw):
    """Compare the naive method with the one-pass QS: time ratio and rank correlation."""
    started = time.perf_counter()
    naive = naive_scores(work, layers, batches)
    naive_s = time.perf_counter() - started
    raw[f"{name}_naive_s"] = [naive_s]
    partials = qs_pass(work, layers, ["int8"], batches)
    totals = reduce_sums(partials, layers)
    local = [totals[layer.name].numerators["int8"] / totals[layer.name].denominator for layer in layers]
    results[f"naive_speedup_{name}"] = naive_s / one_s
    results[f"naive_speedup_target_{name}"] = 0.3 * len(layers)
    results[f"naive_rank_correlation_{name}"] = spearman(local, [naive[layer.name] for layer in layers])


def replan_figure(model, batches, one_s, results, raw):
    result = rayq.compress(model, batches, schemes=["int4", "int8"], evaluation_batches=1)
    scores = result.scores.layer_scores()
    thresholds = [10 ** (-6 + 6 * i / 99) for i in range(100)]
    replan_s, raw["replan_100_s"] = median_time(
        lambda: [make_plan(scores, ["int4", "int8"], t) for t in thresholds], 3)
    results["replan_fraction"] = replan_s / one_s


def scaling_figures(model, batches, repeats, results, raw):
    """Sensitivity phase time on 1 and 2 Ray workers of one thread each, and the Ray overhead."""
    import ray.cloudpickle

    from rayq.driver import cluster

    # Ray workers cannot import this script's modules, so the synthetic model goes by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cluster.connect(None, num_cpus=2)
    timings = {}
    for workers in (1, 2):
        runs = []
        for _ in range(repeats):
            started = time.perf_counter()
            result = rayq.compress(model, batches, schemes=["int8"], workers=workers,
                                   worker_cpus=1, evaluation_batches=1)
            runs.append((time.perf_counter() - started, result.timings["sensitivity_s"]))
        timings[workers] = runs
        raw[f"ray_{workers}_worker_total_s"] = [r[0] for r in runs]
        raw[f"ray_{workers}_worker_sensitivity_s"] = [r[1] for r in runs]
    one = statistics.median(r[1] for r in timings[1])
    two = statistics.median(r[1] for r in timings[2])
    results["scaling_2_workers"] = one / two

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    local_runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = rayq.compress(model, batches, schemes=["int8"], evaluation_batches=1)
        local_runs.append((time.perf_counter() - started, result.timings["sensitivity_s"]))
    torch.set_num_threads(threads)
    raw["in_process_total_s"] = [r[0] for r in local_runs]
    raw["in_process_sensitivity_s"] = [r[1] for r in local_runs]
    local_total = statistics.median(r[0] for r in local_runs)
    local_qs = statistics.median(r[1] for r in local_runs)
    ray_total = statistics.median(r[0] for r in timings[1])
    # Ray actors start before the sensitivity phase, so that phase's extra time is per-batch
    # transfer and scheduling. One batch is held out for evaluation and not scored.
    per_batch = (one - local_qs) / (len(batches) - 1)
    results["ray_overhead_s"] = {"total": ray_total - local_total,
                                 "startup": (ray_total - local_total) - (one - local_qs),
                                 "per_batch": per_batch}


def size_figure(model, batches, results, tmp):
    result = rayq.compress(model, batches, schemes=["int4", "int8"], threshold=1.0,
                           evaluation_batches=1)
    rayq.save(result, tmp, overwrite=True)
    saved = os.path.getsize(os.path.join(tmp, "model", "model.safetensors"))
    predicted = next(r for r in result.thresholds.to_pylist() if r["chosen"])["model_bytes"]
    results["size_ratio_error"] = abs(saved - predicted) / predicted
