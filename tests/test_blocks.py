"""Block-by-block scoring and building of decoder models larger than one worker's weight cap.

The models are transformers' LlamaForCausalLM with small configs and random weights, saved once
per module as safetensors folders. Scores are compared with whole-model scoring of the same
folder at one torch thread, the thread count each Ray worker runs with: matrix products on a
different thread count may add in another order and differ in the last bits.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import rayq
from rayq.config import QuantizationSettings
from rayq.engine.compress import InProcessBackend, prepare
from rayq.errors import ConfigError, ModelError
from rayq.quant.schemes import FLOAT, SCHEMES
from rayq.scoring.quantized import quantize_weight
from rayq.scoring.sensitivity import reduce_sums
from rayq.sources.models import load_source


def save_llama(folder, *, hidden: int, intermediate: int, layers: int, vocab: int,
               tie: bool = False) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=hidden // 64, max_position_embeddings=256,
                         tie_word_embeddings=tie)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    return {"kind": "huggingface", "path": str(folder)}


def token_batches(count: int, rows: int, length: int, vocab: int) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, vocab, (rows, length), generator=generator)}
            for _ in range(count)]


def whole_model_totals(source: dict, batches: list, schemes: list[str], clip_search: bool):
    """QS sums of whole-model scoring in this process, on one torch thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prepared = prepare(load_source(source).module)
        settings = QuantizationSettings(schemes=schemes, clip_search=clip_search)
        backend = InProcessBackend(prepared.model, prepared.layers, settings)
        partials = backend.qs_sums(list(enumerate(batches)), {})
        return reduce_sums(partials, prepared.layers)
    finally:
        torch.set_num_threads(previous)


def assert_totals_equal(block_totals, whole_totals) -> None:
    assert list(block_totals) == list(whole_totals)
    for name, whole in whole_totals.items():
        block = block_totals[name]
        assert block.calls == whole.calls, name
        assert block.denominator == whole.denominator, name
        assert block.numerators == whole.numerators, name


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    return save_llama(folder, hidden=128, intermediate=320, layers=4, vocab=512)


def test_blocks_in_process_equal_whole_model(tiny_llama, tmp_path, one_thread):
    batches = token_batches(3, 2, 12, 512)
    result = rayq.compress_blocks(tiny_llama["path"], batches, weight_cap_bytes=3_500_000)
    assert [b.kind for b in result.blocks] == ["embedding", "layers", "layers", "head"]
    whole = rayq.compress(load_source(tiny_llama).module, batches)
    assert_totals_equal(result.scores.totals, whole.scores.totals)
    assert result.plan.to_pylist() == whole.plan.to_pylist()

    rayq.save(result, str(tmp_path / "blocks"), source=tiny_llama)
    rayq.save(whole, str(tmp_path / "whole"), source=tiny_llama)
    names = sorted(os.listdir(tmp_path / "blocks" / "model"))
    assert names == ["model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors",
                     "model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors",
                     "quant_config.json"]
    from_blocks = rayq.load(str(tmp_path / "blocks"))
    from_whole = rayq.load(str(tmp_path / "whole"))
    with torch.no_grad():
        for batch in batches:
            assert torch.equal(from_blocks(**batch).logits, from_whole(**batch).logits)


def test_blocks_cap_too_small_for_one_layer(tiny_llama):
    with pytest.raises(ModelError, match="raise weight_cap_bytes to at least"):
        rayq.compress_blocks(tiny_llama["path"], token_batches(1, 1, 4, 512),
                             weight_cap_bytes=1000)


@pytest.mark.parametrize("value", [0, -5, 1.5, "1e9", True])
def test_weight_cap_invalid_values(tiny_llama, value):
    with pytest.raises(ConfigError) as caught:
        rayq.compress_blocks(tiny_llama["path"], token_batches(1, 1, 4, 512),
                             weight_cap_bytes=value)
    assert caught.value.exit_code == 2
    assert "weight_cap_bytes" in str(caught.value)


def test_blocks_reject_w8a8(tiny_llama):
    with pytest.raises(ConfigError, match="w8a8"):
        rayq.compress_blocks(tiny_llama["path"], token_batches(1, 1, 4, 512),
                             schemes=["w8a8", "int8"], weight_cap_bytes=2_000_000)


def test_blocks_reject_tied_embeddings(tmp_path):
    source = save_llama(tmp_path / "tied", hidden=64, intermediate=128, layers=1, vocab=128,
                        tie=True)
    with pytest.raises(ModelError, match="tie_word_embeddings"):
        rayq.compress_blocks(source["path"], token_batches(1, 1, 4, 128),
                             weight_cap_bytes=2_000_000)


# The done-when check of block-by-block scoring: a model of at least 1 GB in float32, a cap of a
# quarter of it, 2 CPU workers on Ray. About two minutes on 2 cores and 4 GB of memory at most.
@pytest.mark.slow
def test_llama_1gb_quarter_cap_two_workers(ray_local, tmp_path_factory, tmp_path):
    folder = tmp_path_factory.mktemp("llama-1gb")
    source = save_llama(folder, hidden=1024, intermediate=2816, layers=20, vocab=8192)
    weight_bytes = os.path.getsize(folder / "model.safetensors")
    assert weight_bytes >= 2**30
    cap = weight_bytes // 4
    batches = token_batches(4, 2, 16, 8192)

    # Without the clipping search, quantizing takes seconds instead of about a minute on 2 cores.
    # The memory estimate of each block still counts the search's temporaries.
    result = rayq.compress_blocks(source["path"], batches, workers=2, worker_cpus=1,
                                  weight_cap_bytes=cap, clip_search=False)
    assert len(result.blocks) >= 6
    assert all(block.resident_bytes <= cap for block in result.blocks)

    # Every worker's peak stays under its own baseline (the interpreter, torch, transformers and
    # Ray's runtime before any weight loads) plus the cap plus the block's activations.
    rows = result.memory
    assert {row["worker"] for row in rows} == {0, 1}
    for row in rows:
        allowed = row["baseline_rss_bytes"] + cap + row["activation_bytes"]
        assert row["peak_rss_bytes"] <= allowed, row
    # Equal blocks peak alike however many blocks a worker handled before: neither a dropped
    # block nor the results already written to Ray's object store count in a later peak.
    for phase in ("score", "build"):
        peaks = [row["peak_rss_bytes"] - row["baseline_rss_bytes"] for row in rows
                 if row["phase"] == phase and row["kind"] == "layers"
                 and row["weight_bytes"] == result.blocks[1].weight_bytes]
        assert len(peaks) >= 4
        assert max(peaks) - min(peaks) < result.blocks[1].weight_bytes / 2, (phase, peaks)
    worst = max(row["peak_rss_bytes"] - row["baseline_rss_bytes"] for row in rows)
    print(f"\nmodel {weight_bytes / 1e9:.3f} GB, cap {cap / 1e9:.3f} GB, "
          f"{len(result.blocks)} blocks, largest peak above baseline {worst / 1e9:.3f} GB")

    whole = whole_model_totals(source, batches, ["int4", "int8"], clip_search=False)
    assert_totals_equal(result.scores.totals, whole)

    run = tmp_path / "run"
    rayq.save(result, str(run), source=source)
    config = json.loads((run / "model" / "quant_config.json").read_text())
    assert len(config["weight_files"]) == len(result.blocks)
    loaded = rayq.load(str(run))
    float_model = load_source(source).module
    for decision in result.decisions[:3] + result.decisions[-3:]:
        module = loaded.get_submodule(decision.layer)
        if decision.scheme == FLOAT:
            assert not hasattr(module, "parametrizations")
            continue
        expected = quantize_weight(float_model.get_submodule(decision.layer).weight,
                                   module.parametrizations.weight[0].layout,
                                   SCHEMES[decision.scheme].weights, search=False).dequantize()
        assert torch.equal(module.weight, expected), decision.layer


@pytest.mark.slow
def test_cli_scores_large_model_in_blocks(tiny_llama, tmp_path):
    from conftest import run_cli
    from safetensors.torch import save_file

    calibration = tmp_path / "tokens.safetensors"
    save_file({"input_ids": torch.randint(0, 512, (6, 12), generator=torch.Generator().manual_seed(2))},
              str(calibration))
    completed = run_cli("compress", "--model", tiny_llama["path"], "--calibration", str(calibration),
                        "--output", str(tmp_path / "run"), "--batch-size", "2",
                        "--weight-cap-bytes", "3500000")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "scoring block by block" in completed.stderr
    assert "no held-out error measured" in completed.stdout
    config = json.loads((tmp_path / "run" / "model" / "quant_config.json").read_text())
    assert len(config["weight_files"]) == 4
    assert config["source"] == tiny_llama
    model = rayq.load(str(tmp_path / "run"))
    assert type(model).__name__ == "LlamaForCausalLM"


def test_cli_rejects_invalid_weight_cap(tiny_llama, tmp_path):
    from conftest import run_cli

    completed = run_cli("compress", "--model", tiny_llama["path"], "--calibration", "pydoc:topics",
                        "--output", str(tmp_path / "run"), "--weight-cap-bytes", "0")
    assert completed.returncode == 2
    assert "--weight-cap-bytes: invalid value 0" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_cli_dry_run_lists_blocks(tiny_llama, tmp_path):
    from conftest import run_cli

    completed = run_cli("compress", "--model", tiny_llama["path"], "--calibration", "pydoc:topics",
                        "--output", str(tmp_path / "run"), "--weight-cap-bytes", "3500000",
                        "--dry-run")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "scored block by block" in completed.stdout
    assert completed.stdout.count("block ") >= 4
    assert not (tmp_path / "run").exists()
