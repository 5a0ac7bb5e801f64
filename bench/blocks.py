"""Block-by-block scoring against whole-model scoring on a random-weight Llama-shaped model."""

from __future__ import annotations

import os
import time

import torch
from cost import median_time

import rayq
from rayq.engine.compress import prepare
from rayq.scoring.sensitivity import reduce_sums


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
