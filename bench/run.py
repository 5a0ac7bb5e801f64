"""`make bench`: cost, scaling and size figures of rayq, as ratios measured in one run.

Writes bench/results.json (one key per figure, the machine, versions, commit and every raw
timing) and bench/RESULTS.md. Each timing is the median of REPEATS runs. `--quick` runs the
harness on a tiny model, so the test suite can check that every key is written.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import sys
import time

import torch
from torch import nn

import rayq
from rayq.engine.compress import prepare
from rayq.planning.plan import make_plan
from rayq.quant.schemes import SCHEMES, by_compression
from rayq.scoring.batches import call_model
from rayq.scoring.quantized import WeightBank, quantize_weight
from rayq.scoring.sensitivity import reduce_sums, score_batches

HERE = os.path.dirname(os.path.abspath(__file__))


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up: first calls pay for allocation and kernel selection
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


def synthetic(layers: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*blocks).eval()


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
    from rayq.scoring.batches import float_tensors

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
    prepared = prepare(model)
    layers = prepared.layers
    work = prepared.model
    float_s, raw[f"{name}_float_s"] = median_time(lambda: float_pass(work, batches), repeats)
    one_s, raw[f"{name}_qs_int8_s"] = median_time(lambda: qs_pass(work, layers, ["int8"], batches), repeats)
    two_s, raw[f"{name}_qs_int8_int4_s"] = median_time(
        lambda: qs_pass(work, layers, ["int8", "int4"], batches), repeats)
    results[f"qs_cost_ratio_{name}"] = one_s / float_s
    results[f"qs_extra_scheme_ratio_{name}"] = (two_s - one_s) / float_s
    results[f"float_pass_s_{name}"] = float_s
    return work, layers, one_s


def naive_figures(work, layers, batches, one_s, results, raw):
    started = time.perf_counter()
    naive = naive_scores(work, layers, batches)
    naive_s = time.perf_counter() - started
    raw["naive_s"] = [naive_s]
    partials = qs_pass(work, layers, ["int8"], batches)
    totals = reduce_sums(partials, layers)
    local = [totals[layer.name].numerators["int8"] / totals[layer.name].denominator for layer in layers]
    results["naive_speedup"] = naive_s / one_s
    results["naive_speedup_target"] = 0.3 * len(layers)
    results["naive_rank_correlation"] = spearman(local, [naive[layer.name] for layer in layers])


def replan_figure(model, batches, one_s, results, raw):
    result = rayq.compress(model, batches, schemes=["int4", "int8"], evaluation_batches=1)
    scores = result.scores.layer_scores()
    thresholds = [10 ** (-6 + 6 * i / 99) for i in range(100)]
    replan_s, raw["replan_100_s"] = median_time(
        lambda: [make_plan(scores, ["int4", "int8"], t) for t in thresholds], 3)
    results["replan_fraction"] = replan_s / one_s


def scaling_figures(model, batches, repeats, results, raw):
    """Sensitivity phase time on 1 and 2 Ray workers of one thread each, and the Ray overhead."""
    from rayq.driver import cluster

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

    torch.set_num_threads(1)
    local_runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = rayq.compress(model, batches, schemes=["int8"], evaluation_batches=1)
        local_runs.append((time.perf_counter() - started, result.timings["sensitivity_s"]))
    raw["in_process_total_s"] = [r[0] for r in local_runs]
    raw["in_process_sensitivity_s"] = [r[1] for r in local_runs]
    local_total = statistics.median(r[0] for r in local_runs)
    local_qs = statistics.median(r[1] for r in local_runs)
    ray_total = statistics.median(r[0] for r in timings[1])
    per_batch = (one - local_qs) / (len(batches) - 1)
    results["ray_overhead_s"] = {"total": ray_total - local_total,
                                 "startup": (ray_total - local_total) - (one - local_qs),
                                 "per_batch": per_batch}


def size_figure(model, batches, results, tmp):
    result = rayq.compress(model, batches, schemes=["int4", "int8"], threshold=1.0,
                           evaluation_batches=1)
    rayq.save(result, tmp, overwrite=True)
    saved = os.path.getsize(os.path.join(tmp, "model", "model.safetensors"))
    predicted = [r for r in result.thresholds.to_pylist() if r["chosen"]][0]["model_bytes"]
    results["size_ratio_error"] = abs(saved - predicted) / predicted


def save_llama(folder: str, hidden: int, intermediate: int, layers: int, vocab: int) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 64), tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def whole_scoring(folder, batches):
    """Whole-model scoring from the folder on disk: load, prepare, quantize the bank, one pass."""
    from rayq.config import QuantizationSettings
    from rayq.engine.compress import InProcessBackend
    from rayq.sources.models import load_source

    prepared = prepare(load_source({"kind": "huggingface", "path": folder}).module)
    backend = InProcessBackend(prepared.model, prepared.layers,
                               QuantizationSettings(clip_search=False))
    return reduce_sums(backend.qs_sums(list(enumerate(batches)), {}), prepared.layers)


def block_scoring(folder, batches, cap):
    """Block-by-block scoring of the same folder in this process, under the weight cap."""
    from rayq.config import QuantizationSettings
    from rayq.driver.block_backend import LocalBlockBackend
    from rayq.engine.blocks import score_blocks

    settings = QuantizationSettings(clip_search=False)
    backend = LocalBlockBackend(folder, settings)
    decoder = backend.worker.decoder
    blocks = decoder.plan_blocks(cap, settings.schemes)
    partials, _ = score_blocks(backend, blocks, batches)
    return reduce_sums(partials, decoder.layers)


def block_figures(folder, batches, repeats, results, raw):
    """Cost of block-by-block against whole-model scoring, and the workers' peak memory.

    The cap is a quarter of the model's weights, as in the block-by-block test, or the
    smallest cap the model allows where that is more (the quick model's embedding). Costs are
    measured in this process on one torch thread, so both sides do the same arithmetic, and
    without the clipping search, whose quantization time both sides share equally and which
    would take most of the run on 2 cores.
    """
    from rayq.sources.decoder import DecoderModel

    quarter = os.path.getsize(os.path.join(folder, "model.safetensors")) // 4
    cap = max(quarter, DecoderModel(folder).smallest_cap_bytes(["int4", "int8"]))
    torch.set_num_threads(1)
    whole_s, raw["block_whole_scoring_s"] = median_time(lambda: whole_scoring(folder, batches),
                                                        repeats)
    block_s, raw["block_scoring_s"] = median_time(lambda: block_scoring(folder, batches, cap),
                                                  repeats)
    results["block_cost_ratio"] = block_s / whole_s

    from rayq.driver import cluster

    cluster.connect(None, num_cpus=2)
    started = time.perf_counter()
    result = rayq.compress_blocks(folder, batches, workers=2, worker_cpus=1, weight_cap_bytes=cap,
                                  clip_search=False)
    raw["block_ray_2_workers_s"] = [time.perf_counter() - started]
    worst = max(result.memory, key=lambda r: r["peak_rss_bytes"] - r["baseline_rss_bytes"])
    results["block_peak_rss_bytes"] = worst["peak_rss_bytes"] - worst["baseline_rss_bytes"]
    results["block_peak_rss_target_bytes"] = cap + worst["activation_bytes"]
    results["block_weight_cap_bytes"] = cap
    results["block_count"] = len(result.blocks)


def machine() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=HERE).stdout.strip()
    except OSError:
        commit = "unknown"
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "commit": commit,
            "rayq": rayq.__version__}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny model, one repeat")
    parser.add_argument("--output", default=HERE, help="folder for results.json and RESULTS.md")
    args = parser.parse_args(argv)

    repeats = 1 if args.quick else 3
    layers, width, rows, count = (4, 32, 8, 6) if args.quick else (24, 512, 256, 48)
    model = synthetic(layers, width)
    batches = [torch.randn(rows, width) for _ in range(count)]
    results: dict = {}
    raw: dict = {}

    work, specs, one_s = cost_figures("synthetic", model, batches, repeats, results, raw)
    naive_figures(work, specs, batches, one_s, results, raw)
    replan_figure(model, batches, one_s, results, raw)
    with tempfile.TemporaryDirectory() as folder:
        size_figure(model, batches, results, os.path.join(folder, "run"))
    scaling_figures(model, batches, repeats, results, raw)
    with tempfile.TemporaryDirectory() as folder:
        shape = (128, 320, 4, 512) if args.quick else (1024, 2816, 16, 8192)
        save_llama(folder, *shape)
        generator = torch.Generator().manual_seed(1)
        tokens = [{"input_ids": torch.randint(0, shape[3], (2, 16), generator=generator)}
                  for _ in range(2 if args.quick else 4)]
        block_figures(folder, tokens, repeats, results, raw)

    payload = {"figures": results, "raw_s": raw, "machine": machine(),
               "command": " ".join([os.path.basename(sys.executable), "bench/run.py", *(argv or sys.argv[1:])])}
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "results.json"), "w") as handle:
        json.dump(payload, handle, indent=2)
    with open(os.path.join(args.output, "RESULTS.md"), "w") as handle:
        handle.write(render(payload))
    print(render(payload))
    return 0


TARGETS = {
    "qs_cost_ratio_synthetic": ("<=", 2.5),
    "replan_fraction": ("<=", 0.01),
    "scaling_2_workers": (">=", 1.7),
    "size_ratio_error": ("<=", 0.01),
    "block_cost_ratio": ("<=", 1.3),
}
# Figures whose target is another figure of the same run.
RELATIVE_TARGETS = {"naive_speedup": (">=", "naive_speedup_target"),
                    "block_peak_rss_bytes": ("<=", "block_peak_rss_target_bytes")}


def render(payload: dict) -> str:
    figures = payload["figures"]
    lines = ["# rayq benchmark results", "",
             f"Machine: {payload['machine']['cpu_count']} CPUs, {payload['machine']['platform']}, "
             f"Python {payload['machine']['python']}, torch {payload['machine']['torch']}, "
             f"commit {payload['machine']['commit'][:12]}.",
             f"Command: `{payload['command']}` (medians of repeated runs; raw timings in "
             "results.json).", "", "| figure | value | target | met |", "|---|---|---|---|"]
    for key, value in figures.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v:.3g} s" for k, v in value.items())
            lines.append(f"| {key} | {value} | | |")
            continue
        target = TARGETS.get(key)
        if key in RELATIVE_TARGETS:
            op, other = RELATIVE_TARGETS[key]
            target = (op, figures[other])
        met = ""
        if target:
            op, bound = target
            met = "yes" if (value <= bound if op == "<=" else value >= bound) else "MISSED"
        shown = f"{op} {bound:.3g}" if target else ""
        lines.append(f"| {key} | {value:.4g} | {shown} | {met} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
