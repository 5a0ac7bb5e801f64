"""The real pretrained model: all-MiniLM-L6-v2 calibrated on Python documentation prose.

One compression run at threshold 0.001 is shared by the tests; its threshold table also contains the
recommended 0.005, since the ladder is planned from the same scores.
"""

from __future__ import annotations

import os

import pytest
import torch

import rayq
from rayq.sources.data import load_batches
from rayq.storage.run import load_run_model, open_run, write_run

pytestmark = pytest.mark.slow

# 40 batches of 16 paragraphs: the first 36 are scored, the last 4 (64 paragraphs) are held out.
BATCHES = 40
FLOAT_MB = 91.0
SIZE_LIMIT_MB = 24.0
COSINE_TARGET = 0.999


@pytest.fixture(scope="module")
def compressed(minilm):
    torch.manual_seed(0)
    batches = load_batches("pydoc:topics", minilm.tokenizer, batch_size=16, max_length=128,
                           max_batches=BATCHES)
    result = rayq.compress(minilm.module, batches, threshold=0.001)
    return result, batches


def _row(result, threshold):
    rows = [r for r in result.thresholds.to_pylist() if r["threshold"] == threshold]
    assert len(rows) == 1
    return rows[0]


def test_minilm_held_out_is_not_in_sample(compressed):
    result, _ = compressed
    assert not result.in_sample


def test_minilm_fidelity_at_0_001(compressed):
    result, _ = compressed
    row = _row(result, 0.001)
    print(f"\nMiniLM threshold 0.001: cosine mean {row['cosine_mean']:.5f} min "
          f"{row['cosine_min']:.5f}, {row['model_bytes'] / 1e6:.2f} MB, ratio "
          f"{row['compression_ratio']:.2f}x")
    assert row["cosine_mean"] >= COSINE_TARGET
    assert row["model_bytes"] <= SIZE_LIMIT_MB * 1e6


@pytest.mark.xfail(strict=True, reason="known gap: with int4 among the candidates, three FFN "
                   "output projections take int4 at 0.005 (local QS 0.002-0.003) and the "
                   "embedding cosine falls to about 0.992; see test_minilm_int8_candidates_at_0_005")
def test_minilm_fidelity_at_0_005(compressed):
    result, _ = compressed
    row = _row(result, 0.005)
    print(f"\nMiniLM threshold 0.005: cosine mean {row['cosine_mean']:.5f}, "
          f"{row['model_bytes'] / 1e6:.2f} MB")
    assert row["cosine_mean"] >= COSINE_TARGET


def test_minilm_int8_candidates_at_0_005(compressed, tmp_path):
    """The demo's setting: threshold 0.005 with int8 as the only candidate.

    Re-planned from the shared run's scores (no scoring pass); the new plans are measured on the
    held-out paragraphs. Every layer's int8 QS is below 0.005 here, so the plan is int8 for
    every weight, embeddings included.
    """
    result, _ = compressed
    int8_only = result.replan(0.005, evaluate=True, schemes=["int8"])
    row = _row(int8_only, 0.005)
    location = str(tmp_path / "run")
    write_run(int8_only, location, config={"threshold": 0.005}, source=None)
    saved = os.path.getsize(os.path.join(location, "model", "model.safetensors"))
    print(f"\nMiniLM threshold 0.005, int8 candidates: cosine mean {row['cosine_mean']:.5f} min "
          f"{row['cosine_min']:.5f}, saved {saved / 1e6:.2f} MB of {FLOAT_MB} MB, ratio "
          f"{row['compression_ratio']:.2f}x")
    assert row["cosine_mean"] >= COSINE_TARGET
    assert saved <= SIZE_LIMIT_MB * 1e6
    assert row["layers_int4"] == 0


def test_minilm_saved_size_and_round_trip(compressed, minilm, tmp_path):
    result, batches = compressed
    location = str(tmp_path / "run")
    write_run(result, location, config={"threshold": 0.001}, source=None)
    saved = os.path.getsize(os.path.join(location, "model", "model.safetensors"))
    predicted = _row(result, 0.001)["model_bytes"]
    print(f"\nMiniLM saved model {saved / 1e6:.2f} MB, predicted {predicted / 1e6:.2f} MB, "
          f"float {FLOAT_MB} MB")
    assert saved <= SIZE_LIMIT_MB * 1e6
    # Safetensors adds a JSON header and the plan does not count it; 1% covers it.
    assert abs(saved - predicted) / predicted < 0.01

    loaded = load_run_model(open_run(location), minilm.module)
    with torch.no_grad():
        expected = result.model(**batches[-1])
        actual = loaded(**batches[-1])
    assert torch.equal(expected, actual)
