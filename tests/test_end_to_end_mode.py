"""End-to-end sensitivity mode: quantize one layer at a time and score the whole model's output."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rayq
from rayq.quant.schemes import SCHEMES
from rayq.scoring.quantized import quantize_weight

SCHEMES_UNDER_TEST = ["int4", "int8", "w8a8"]

pytestmark = pytest.mark.usefixtures("pickled_by_value")


class Mixed(nn.Module):
    """Embedding, convolution, LSTM, attention and Linear layers, returning a dict."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1, groups=4)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.hidden = nn.Linear(16, 32)
        self.head = nn.Linear(32, 6)

    def forward(self, ids):
        x = self.embed(ids)
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        x, _ = self.lstm(x)
        x, _ = self.attention(x, x, x)
        return {"logits": self.head(torch.relu(self.hidden(x)))}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(3)
    model = Mixed().eval()
    batches = [torch.randint(0, 40, (3, 7)) for _ in range(6)]
    result = rayq.compress(model, batches, schemes=SCHEMES_UNDER_TEST,
                           sensitivity_mode="end_to_end")
    return model, batches, result


def _columns(result):
    return result.sensitivity.select(["layer", "scheme", "qs", "qs_end_to_end",
                                      "qs_end_to_end_numerator"]).to_pylist()


def test_end_to_end_matches_reference(setup):
    """Each int8 score equals quantizing that layer alone in a copy and running the model."""
    model, batches, result = setup
    rows = {(r["layer"], r["scheme"]): r for r in result.sensitivity.to_pylist()}
    for name in ["embed", "conv", "hidden", "head"]:
        quantized = copy.deepcopy(model)
        module = quantized.get_submodule(name)
        q = quantize_weight(module.weight, _layout(result, name), SCHEMES["int8"].weights)
        with torch.no_grad():
            module.weight.copy_(q.dequantize())
            error = signal = 0.0
            for batch in batches:
                reference = model(batch)["logits"].double()
                error += float(((quantized(batch)["logits"].double() - reference) ** 2).sum())
                signal += float((reference ** 2).sum())
        expected = error / signal
        # float32 forward passes in another order of layers' calls; 1e-6 relative covers rounding.
        assert rows[(name, "int8")]["qs_end_to_end"] == pytest.approx(expected, rel=1e-6)


def _layout(result, name):
    layer = next(layer for layer in result.scores.layers if layer.name == name)
    return layer.weights[0].layout


def test_last_layer_end_to_end_equals_local(setup):
    """The head's output is the model's output, so both scores measure the same error."""
    _, _, result = setup
    for row in result.sensitivity.to_pylist():
        if row["layer"] == "head" and row["fits"]:
            assert row["qs_end_to_end"] == pytest.approx(row["qs"], rel=1e-9)


def test_plan_uses_end_to_end_scores(setup):
    _, _, result = setup
    rows = {(r["layer"], r["scheme"]): r for r in result.sensitivity.to_pylist()}
    for row in result.plan.to_pylist():
        if row["quantizable"] and row["scheme"] != "float":
            assert row["qs"] == rows[(row["layer"], row["scheme"])]["qs_end_to_end"]


def test_end_to_end_equal_on_ray_workers(setup, ray_local):
    """In-process, 1 worker and 2 workers give bitwise-equal scores and the same plan."""
    model, batches, in_process = setup
    for workers in (1, 2):
        on_ray = rayq.compress(model, batches, schemes=SCHEMES_UNDER_TEST,
                               sensitivity_mode="end_to_end", workers=workers, worker_cpus=1)
        assert _columns(on_ray) == _columns(in_process)
        assert on_ray.plan.equals(in_process.plan)


def test_end_to_end_survives_worker_death(setup, ray_local):
    model, batches, in_process = setup
    on_ray = rayq.compress(model, batches, schemes=SCHEMES_UNDER_TEST,
                           sensitivity_mode="end_to_end", workers=2, worker_cpus=1,
                           fault={"slot": 1, "after_chunks": 3})
    assert _columns(on_ray) == _columns(in_process)
    assert sum(w["restarts"] for w in on_ray.workers) == 1
