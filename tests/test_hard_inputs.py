"""Hard inputs from the field: weights, ranges, layouts, call patterns and data that users bring.

Each case runs through the public API (`rayq.compress`, `write_run`, the CLI's `main`) and checks
the numbers that come out against values computed here from the float model.
"""

from __future__ import annotations

import copy
import math
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors.torch
import torch
from torch import nn
from torch.nn.utils import parametrize

import rayq
from rayq.engine.compress import prepare
from rayq.engine.stored import scores_from_table
from rayq.errors import ModelError
from rayq.model.compressed import (
    INPUT_SCALE,
    INPUT_ZERO_POINT,
    QuantizedWeight,
    quantized_weights,
)
from rayq.planning.plan import make_plan
from rayq.quant.activations import ActivationParams, fake_quantize_activation
from rayq.quant.weights import dequantize_rows
from rayq.scoring.sensitivity import gather_activation_stats
from rayq.storage.run import load_run_model, open_run, write_run

# float32 rounding of w / scale and of code * scale moves a restored weight by at most about
# 127 * 2**-24 * scale (7.6e-6 scale) beyond the half step, so 1e-5 scale covers it.
HALF_STEP_SLACK = 1e-5


from helpers import plan_rows, quantizer, randn_batches, sensitivity_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def restored_rows(quantized: QuantizedWeight) -> torch.Tensor:
    """Return the float32 (rows, columns) matrix that a quantized weight stores, before any cast."""
    return dequantize_rows(quantized.int_codes(), quantized.scales, quantized.fmt)


def clipped_or_within_half_step(rows: torch.Tensor, restored: torch.Tensor, scales: torch.Tensor,
                                qmax: int) -> torch.Tensor:
    """Mark each element that restores to within half a step of its float value.

    `scales` has one scale per row. The clip search may choose a scale below absmax / qmax, so an
    element beyond qmax * scale must instead restore to the clipping limit.
    """
    rows, restored, scales = rows.double(), restored.double(), scales.double().reshape(-1, 1)
    limit = qmax * scales
    inside = rows.abs() <= limit
    within = (restored - rows).abs() <= scales * (0.5 + HALF_STEP_SLACK)
    at_limit = (restored.abs() - limit).abs() <= limit * HALF_STEP_SLACK
    return torch.where(inside, within, at_limit)


# 1. Zero and tiny output channels.

@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_zero_and_tiny_rows(dtype, scheme):
    torch.manual_seed(0)
    model = nn.Linear(48, 24, bias=False)
    with torch.no_grad():
        model.weight[5] = 0.0
        model.weight[9] *= 2e-6 / model.weight[9].abs().max()
    model = model.to(dtype).eval()
    batches = randn_batches(2, 8, 48, dtype=dtype)
    result = rayq.compress(model, batches, schemes=[scheme],
                           pins=[{"pattern": ".*", "scheme": scheme}])

    quantized = quantizer(result.model, "")
    weight = model.weight.detach().float()
    restored = restored_rows(quantized)
    scales = quantized.scales[:, 0]
    assert quantized.scales.shape == (24, 1)
    assert torch.isfinite(quantized.scales).all()
    assert (quantized.scales > 0).all()
    assert torch.equal(quantized.int_codes()[5], torch.zeros(48, dtype=torch.int8))
    assert torch.isfinite(restored).all()
    assert torch.equal(restored[5], torch.zeros(48))
    assert float(restored[9].abs().max()) > 0.0
    qmax = quantized.fmt.qmax
    assert clipped_or_within_half_step(weight[9:10], restored[9:10], scales[9:10], qmax).all()
    assert torch.isfinite(result.model.weight).all()
    assert torch.isfinite(result.model(batches[0])).all()
    qs = [row["qs"] for row in result.sensitivity.to_pylist()]
    assert all(math.isfinite(value) for value in qs)


# 2. One-sided ranges.

class ShiftedInput(nn.Module):
    """A Linear whose input is sigmoid(x) * 3 + 2, always in [2, 5] (or [-5, -2] with sign -1)."""

    def __init__(self, sign: float):
        super().__init__()
        self.sign = sign
        self.fc = nn.Linear(16, 8)

    def shifted(self, x: torch.Tensor) -> torch.Tensor:
        return self.sign * (torch.sigmoid(x) * 3 + 2)

    def forward(self, x):
        return self.fc(self.shifted(x))


@pytest.mark.parametrize("method", ["mse", "minmax"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_one_sided_ranges(sign, method):
    torch.manual_seed(1)
    model = ShiftedInput(sign).eval()
    with torch.no_grad():
        model.fc.weight[3] = torch.rand(16) * 10 - 30  # every value in [-30, -20]
    batches = randn_batches(4, 32, 16, seed=1)
    result = rayq.compress(model, batches, schemes=["w8a8"], activation_method=method,
                           pins=[{"pattern": "fc", "scheme": "w8a8"}])

    fc = result.model.fc
    zero_point = getattr(fc, INPUT_ZERO_POINT)
    params = ActivationParams(float(getattr(fc, INPUT_SCALE)), int(zero_point))
    assert not zero_point.is_floating_point()
    assert 0 <= params.zero_point <= 255
    assert params.scale > 0
    assert float(fake_quantize_activation(torch.zeros(1), params)) == 0.0

    inputs = torch.cat([model.shifted(x) for x in batches])
    restored = fake_quantize_activation(inputs, params)
    assert float((restored - inputs).abs().max()) <= params.scale * (0.5 + HALF_STEP_SLACK)

    quantized = quantizer(result.model, "fc")
    row = model.fc.weight.detach()[3:4]
    error = (restored_rows(quantized)[3:4] - row).abs()
    assert float(error.max()) <= float(quantized.scales[3]) * (0.5 + HALF_STEP_SLACK)


# 3. Depthwise convolution with a channel multiplier.

def per_channel_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Return the relative error of each channel (dim 1) of a convolution output."""
    actual, expected = actual.detach().double(), expected.detach().double()
    dims = [d for d in range(expected.dim()) if d != 1]
    return (actual - expected).square().sum(dims).sqrt() / expected.square().sum(dims).sqrt()


def test_depthwise_multiplier_scales():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(6, 12, 3, groups=6, padding=1)).eval()
    # Four decades, shuffled so the two output channels of one input channel differ widely.
    magnitudes = torch.logspace(-2, 2, 12)[torch.randperm(12)]
    with torch.no_grad():
        weight = model[0].weight
        weight.mul_((magnitudes / weight.abs().amax((1, 2, 3))).reshape(12, 1, 1, 1))
    batches = randn_batches(2, 2, 6, 8, 8, seed=2)
    result = rayq.compress(model, batches, schemes=["int8"],
                           pins=[{"pattern": "0", "scheme": "int8"}])

    quantized = quantizer(result.model, "0")
    scales = quantized.scales[:, 0]
    rows = model[0].weight.detach().reshape(12, -1)
    restored = restored_rows(quantized)
    assert quantized.scales.shape == (12, 1)
    assert (scales <= magnitudes / 127 * (1 + 1e-6)).all()
    assert clipped_or_within_half_step(rows, restored, scales, 127).all()
    # int8 per channel on 9-element rows: measured at most 5.1e-3 for the weights and 5.0e-3 for
    # the outputs of any channel.
    weight_error = (restored - rows).norm(dim=1) / rows.norm(dim=1)
    assert float(weight_error.max()) < 1e-2
    x = batches[0]
    assert float(per_channel_relative_error(result.model(x), model(x)).max()) < 1e-2


# 4. Transposed convolutions: output channels live in weight dim 1, per group.

def transposed_channel(weight: torch.Tensor, groups: int, channel: int) -> torch.Tensor:
    """Return the part of a ConvTranspose weight (in, out / groups, *kernel) that one output
    channel reads."""
    in_per_group, out_per_group = weight.shape[0] // groups, weight.shape[1]
    group, index = divmod(channel, out_per_group)
    return weight[group * in_per_group:(group + 1) * in_per_group, index]


def transposed_rows(weight: torch.Tensor, groups: int) -> torch.Tensor:
    count = weight.shape[1] * groups
    return torch.stack([transposed_channel(weight, groups, c).reshape(-1) for c in range(count)])


@pytest.mark.parametrize("in_channels, out_channels, groups, padding", [
    (4, 8, 2, 0),
    (3, 48, 1, 1),
])
def test_conv_transpose_channel_scales(in_channels, out_channels, groups, padding, tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.ConvTranspose2d(in_channels, out_channels, 3, groups=groups,
                                             padding=padding)).eval()
    # Two decades, shuffled so that neighbouring output channels differ widely.
    magnitudes = torch.logspace(-1, 1, out_channels)[torch.randperm(out_channels)]
    with torch.no_grad():
        for channel in range(out_channels):
            part = transposed_channel(model[0].weight, groups, channel)
            part.mul_(magnitudes[channel] / part.abs().max())
    batches = randn_batches(2, 2, in_channels, 7, 7, seed=3)
    result = rayq.compress(model, batches, schemes=["int8"],
                           pins=[{"pattern": "0", "scheme": "int8"}])

    quantized = quantizer(result.model, "0")
    scales = quantized.scales[:, 0]
    rows = transposed_rows(model[0].weight.detach(), groups)
    restored = transposed_rows(result.model[0].weight.detach(), groups)
    assert quantized.scales.shape == (out_channels, 1)
    assert quantized.scales.shape[0] != in_channels
    assert (scales <= magnitudes / 127 * (1 + 1e-6)).all()
    assert (scales >= magnitudes / 127 * 0.7).all()
    assert clipped_or_within_half_step(rows, restored, scales, 127).all()

    x = batches[0]
    # int8 per output channel on 18- and 27-element rows: measured at most 5.1e-3 per channel.
    error = per_channel_relative_error(result.model(x), model(x))
    assert float(error.max()) < 1e-2

    write_run(result, str(tmp_path / "run"), config={})
    loaded = load_run_model(open_run(str(tmp_path / "run")), copy.deepcopy(model))
    assert torch.equal(loaded(x), result.model(x))


# 5. Bias handling.

def on_int8_grid(rows: int, columns: int, seed: int) -> torch.Tensor:
    """Return integer codes times 2**-7 with +-127 in every row, which int8 stores exactly."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (rows, columns), generator=generator)
    codes[:, 0] = 127 * torch.where(torch.rand(rows, generator=generator) < 0.5, -1, 1)
    return codes.float() * 2.0**-7


def biased_pair() -> nn.Sequential:
    """Build Linear without bias, then Linear with bias 0.25, both with weights on the int8 grid."""
    model = nn.Sequential(nn.Linear(6, 6, bias=False), nn.Linear(6, 6)).eval()
    with torch.no_grad():
        model[0].weight.copy_(on_int8_grid(6, 6, seed=4))
        model[1].weight.copy_(on_int8_grid(6, 6, seed=5))
        model[1].bias.fill_(0.25)
    return model


def test_bias_kept_and_absent(tmp_path):
    model = biased_pair()
    batches = randn_batches(2, 4, 6, seed=4)
    result = rayq.compress(model, batches, schemes=["int8"],
                           pins=[{"pattern": ".*", "scheme": "int8"}])
    write_run(result, str(tmp_path / "run"), config={})
    loaded = load_run_model(open_run(str(tmp_path / "run")), biased_pair())

    x = batches[0]
    expected = model(x).detach()
    for compressed in (result.model, loaded):
        assert compressed[0].bias is None
        assert "0.bias" not in compressed.state_dict()
        assert torch.equal(compressed[1].bias, model[1].bias)
        assert len(quantized_weights(compressed)) == 2
        # Weights on the grid are stored exactly, so only float rounding could differ.
        assert float((compressed(x).detach() - expected).abs().max()) <= 1e-6


# 6. One module called twice.

class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 12)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x)) * 50

    def forward(self, x):
        return self.fc(self.hidden(x))


def test_module_called_twice():
    torch.manual_seed(6)
    model = CalledTwice().eval()
    (x,) = randn_batches(1, 16, 12, seed=6)
    result = rayq.compress(model, [x], schemes=["w8a8"], activation_method="minmax",
                           pins=[{"pattern": "fc", "scheme": "w8a8"}])

    row = sensitivity_rows(result)[("fc", "w8a8")]
    hidden = model.hidden(x).detach()
    first, second = model.fc(x).detach(), model(x).detach()
    signal = float(first.double().square().sum() + second.double().square().sum())
    assert row["calls"] == 2
    assert row["qs_denominator"] == pytest.approx(signal, rel=1e-12)

    fc = result.model.fc
    params = ActivationParams(float(getattr(fc, INPUT_SCALE)), int(getattr(fc, INPUT_ZERO_POINT)))
    weight, bias = fc.weight.detach(), fc.bias.detach()

    def quantized_fc(values):
        return nn.functional.linear(fake_quantize_activation(values, params), weight, bias)

    error = float((quantized_fc(x).double() - first.double()).square().sum()
                  + (quantized_fc(hidden).double() - second.double()).square().sum())
    # The sums may subtract the float32 outputs before widening to float64, which rounds where
    # two outputs differ by more than a factor of 2: measured 9.7e-10 relative here.
    assert row["qs_numerator"] == pytest.approx(error, rel=1e-6)

    # minmax covers both inputs: x (negative values) and the hidden input (up to 50 * max).
    prepared = prepare(model)
    stats = gather_activation_stats(prepared.model, prepared.layers, [(0, x)])
    assert stats["fc"].total == x.numel() + hidden.numel()
    assert stats["fc"].minimum == float(x.min())
    assert stats["fc"].maximum == float(hidden.max())
    assert params.low <= float(x.min()) + params.scale / 2
    assert params.high >= float(hidden.max()) - params.scale / 2

    assert len(quantized_weights(result.model)) == 1
    expected = quantized_fc(torch.relu(quantized_fc(x)) * 50)
    assert torch.equal(result.model(x), expected)


# 7. Layers that calibration never reaches.

class Routed(nn.Module):
    """Top-1 routing over 4 experts. Every expert is called on the rows routed to it, even none."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(8, 4)
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.spare = nn.Linear(8, 8)  # forward never calls it

    def forward(self, x):
        choice = self.router(x).argmax(-1)
        out = torch.zeros_like(x)
        for index, expert in enumerate(self.experts):
            chosen = choice == index
            out[chosen] = expert(x[chosen])
        return out


def routed_model() -> Routed:
    torch.manual_seed(7)
    model = Routed().eval()
    with torch.no_grad():
        # Experts 0-2 never look at feature 7; expert 3 wins only when feature 7 is large.
        model.router.weight[:, 7] = 0.0
        model.router.weight[3] = 0.0
        model.router.weight[3, 7] = 100.0
        model.router.bias[3] = -50.0
    return model


def calibration_without_feature_7(count: int) -> list[torch.Tensor]:
    batches = randn_batches(count, 16, 8, seed=7)
    for batch in batches:
        batch[:, 7] = 0.0
    return batches


def numeric_values(table: pa.Table) -> list[float]:
    values = []
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_floating(column.type) or pa.types.is_integer(column.type):
            values += [v for v in column.to_pylist() if v is not None]
    return values


@pytest.mark.parametrize("mode", ["local", "end_to_end"])
def test_unreached_layers_stay_float(mode, tmp_path):
    model = routed_model()
    result = rayq.compress(model, calibration_without_feature_7(4), schemes=["int4", "int8"],
                           threshold=1.0, sensitivity_mode=mode)

    rows = sensitivity_rows(result)
    plan = plan_rows(result)
    for name in ("experts.3", "spare"):
        for scheme in ("int4", "int8"):
            assert rows[(name, scheme)]["calls"] == 0
            assert rows[(name, scheme)]["qs"] is None
            assert rows[(name, scheme)]["qs_end_to_end"] is None
        assert plan[name]["scheme"] == "float"
        assert "never reached" in plan[name]["reason"]
        assert not parametrize.is_parametrized(result.model.get_submodule(name))
    assert plan["experts.0"]["scheme"] != "float"

    write_run(result, str(tmp_path / "run"), config={})
    for name in ("sensitivity", "plan", "thresholds"):
        table = pq.read_table(str(tmp_path / "run" / f"{name}.parquet"))
        assert all(math.isfinite(v) for v in numeric_values(table)), name
    summary = (tmp_path / "run" / "summary.txt").read_text()
    assert "never reached" in summary

    routed = randn_batches(1, 5, 8, seed=8)[0]
    routed[:, 7] = 10.0
    assert (model.router(routed).argmax(-1) == 3).all()
    output = result.model(routed)
    assert torch.isfinite(output).all()
    assert torch.equal(output, model(routed))


def test_w8a8_pin_on_unreached_layer():
    # A w8a8 pin needs input statistics, which a layer calibration never reached does not have.
    model = routed_model()
    result = rayq.compress(model, calibration_without_feature_7(2), schemes=["int8", "w8a8"],
                           threshold=1.0, pins=[{"pattern": "spare|experts\\.3", "scheme": "w8a8"}])

    plan = plan_rows(result)
    for name in ("experts.3", "spare"):
        assert plan[name]["scheme"] == "float"
        assert "never reached" in plan[name]["reason"]
        assert not parametrize.is_parametrized(result.model.get_submodule(name))


# 8. Rounding ties.

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rounding_ties_half_to_even(dtype):
    model = nn.Sequential(nn.Linear(12, 4, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.copy_(on_int8_grid(4, 12, seed=8))
    model = model.to(dtype)
    # minmax over [-0.5, 63.25] gives scale 63.75 / 255 = 0.25 and zero point 2.
    calibration = torch.linspace(-0.5, 63.25, 12 * 8).reshape(8, 12).to(dtype)
    result = rayq.compress(model, [calibration], schemes=["w8a8"], activation_method="minmax",
                           pins=[{"pattern": "0", "scheme": "w8a8"}])
    compressed = result.model
    assert float(getattr(compressed[0], INPUT_SCALE)) == 0.25
    assert int(getattr(compressed[0], INPUT_ZERO_POINT)) == 2

    # x / scale = -1.5, -0.5, 0.5, ..., 9.5: every input sits on a tie.
    ratios = torch.arange(-1.5, 10.0, 1.0)
    x = (ratios * 0.25).to(dtype).reshape(1, 12)
    half_to_even = torch.tensor([-2.0, -0.0, 0.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 8.0, 8.0, 10.0])
    seen = []
    compressed[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))

    rayq.enable_training(compressed)
    quantized = quantizer(compressed, "0")
    codes = on_int8_grid(4, 12, seed=8) * 2.0**7
    with torch.no_grad():
        # Put every latent weight below 127 on a tie between two codes as well.
        quantized.latent.copy_(torch.where(codes.abs() < 127, codes + 0.5, codes) * 2.0**-7)
    trained = compressed(x).detach()
    rayq.freeze(compressed)
    exported = compressed(x)

    assert torch.equal(trained, exported)
    assert torch.equal(seen[0].float(), (half_to_even * 0.25).reshape(1, 12))
    assert torch.equal(seen[1], seen[0])
    even_codes = torch.where((codes.abs() < 127) & (codes % 2 != 0), codes + 1, codes)
    assert torch.equal(quantized.int_codes().float(), even_codes)


# 9. Degenerate scores.

class SqrtLinear(nn.Linear):
    """A Linear followed by a square root: NaN wherever the quantized output turns negative."""

    def forward(self, x):
        return torch.sqrt(super().forward(x))


class Degenerate(nn.Module):
    def __init__(self):
        super().__init__()
        self.silent = nn.Linear(2, 2)
        self.cancel = nn.Linear(2, 1, bias=False)
        self.root = SqrtLinear(2, 1, bias=False)
        with torch.no_grad():
            self.silent.weight.zero_()
            self.silent.bias.zero_()
            # 0.5 * a - 0.25 * (2 * a) is exactly 0, but -0.25 is no int8 or int4 code of this row.
            self.cancel.weight.copy_(torch.tensor([[0.5, -0.25]]))
            # 0.5 * a - 0.25 * (1.99 * a) > 0, but the quantized -0.25 makes it negative.
            self.root.weight.copy_(torch.tensor([[0.5, -0.25]]))

    def forward(self, a):
        return (self.silent(torch.cat([a, a], -1)), self.cancel(torch.cat([a, 2 * a], -1)),
                self.root(torch.cat([a, 1.99 * a], -1)))


def test_degenerate_scores(tmp_path):
    model = Degenerate().eval()
    batches = [batch.abs() + 0.1 for batch in randn_batches(3, 8, 1, seed=9)]
    assert all(torch.isfinite(out).all() for out in model(batches[0]))
    result = rayq.compress(model, batches, schemes=["int4", "int8"], threshold=1.0)

    rows = sensitivity_rows(result)
    plan = plan_rows(result)
    for scheme in ("int4", "int8"):
        assert rows[("silent", scheme)]["qs"] == 0.0
        assert rows[("cancel", scheme)]["qs_denominator"] == 0.0
        assert rows[("cancel", scheme)]["qs"] == math.inf
        assert rows[("root", scheme)]["qs"] is None
        assert "not finite" in rows[("root", scheme)]["flag"]
    assert plan["silent"]["scheme"] == "int4"
    assert plan["cancel"]["scheme"] == "float"
    assert plan["root"]["scheme"] == "float"
    assert "flagged" in plan["root"]["reason"]
    assert not any(math.isnan(v) for v in numeric_values(result.sensitivity))

    # No threshold lets the NaN through: not the largest finite one, not after a reload.
    largest = result.replan(1.7e308)
    assert plan_rows(largest)["root"]["scheme"] == "float"
    assert plan_rows(largest)["cancel"]["scheme"] == "float"
    write_run(result, str(tmp_path / "run"), config={})
    stored = scores_from_table(open_run(str(tmp_path / "run")).table("sensitivity"), prepare(model))
    decisions = {d.layer: d for d in make_plan(stored.layer_scores(), ["int4", "int8"], 1.7e308)}
    assert decisions["root"].scheme == "float"
    assert "flagged" in decisions["root"].reason


# 10. Batch shape and mode.

def stacked_model() -> nn.Module:
    torch.manual_seed(10)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


BATCHINGS = {"ones": [1] * 6, "twos": [2] * 3, "ragged": [4, 2]}


@pytest.fixture(scope="module")
def batching_results():
    model = stacked_model()
    (samples,) = randn_batches(1, 6, 16, seed=10)
    results = {}
    for name, sizes in BATCHINGS.items():
        batches = list(torch.split(samples, sizes))
        prepared = prepare(model)
        stats = gather_activation_stats(prepared.model, prepared.layers, list(enumerate(batches)))
        result = rayq.compress(model, batches, schemes=["int8", "w8a8"], threshold=1.0)
        results[name] = (stats, result)
    return results


@pytest.mark.parametrize("name", ["twos", "ragged"])
def test_batching_same_histograms(batching_results, name):
    # Layer "0" reads the data itself, so its histogram must match bit for bit. Layer "2" reads
    # relu of a matmul, and torch's CPU matmul rounds differently for different batch shapes
    # (measured: 59 of the 192 hidden values differ in the last bit between batches of 1 and 6).
    # Its counts still match unless a value sits within a rounding error of a bin edge. Bins are
    # 3% wide, so we estimate that chance at 59 * 2 * 6e-8 / 0.03, about 2e-4. Its min and max
    # may move by a rounding error.
    reference, reference_result = batching_results["ones"]
    stats, result = batching_results[name]
    assert sorted(stats) == ["0", "2"]
    assert sorted(reference) == ["0", "2"]
    for layer in ("0", "2"):
        assert torch.equal(stats[layer].counts, reference[layer].counts), layer
    assert stats["0"].minimum == reference["0"].minimum
    assert stats["0"].maximum == reference["0"].maximum
    assert stats["2"].minimum == pytest.approx(reference["2"].minimum, rel=1e-6)
    assert stats["2"].maximum == pytest.approx(reference["2"].maximum, rel=1e-6)

    scales = {row["layer"]: row["input_scale"] for row in result.sensitivity.to_pylist()
              if row["scheme"] == "w8a8"}
    reference_scales = {row["layer"]: row["input_scale"]
                        for row in reference_result.sensitivity.to_pylist()
                        if row["scheme"] == "w8a8"}
    assert scales["0"] == reference_scales["0"]
    assert scales["2"] == pytest.approx(reference_scales["2"], rel=1e-6)


@pytest.mark.parametrize("name", ["twos", "ragged"])
def test_batching_same_qs(batching_results, name):
    # QS is not expected to match bit for bit. The float64 sums add per-batch partial sums in a
    # different grouping, and the float32 layer outputs differ in the last bit between batch
    # shapes (see above). QS is the energy of a small difference of two outputs, so a last-bit
    # change moves it far more than it moves the outputs. Measured: at most 6.3e-6 relative for
    # QS and 8.7e-8 for its denominator, so the bounds below leave a margin of about 10x.
    reference = sensitivity_rows(batching_results["ones"][1])
    rows = sensitivity_rows(batching_results[name][1])
    for key, row in reference.items():
        assert rows[key]["qs"] == pytest.approx(row["qs"], rel=1e-4), key
        assert rows[key]["qs_denominator"] == pytest.approx(row["qs_denominator"], rel=1e-6), key


def test_train_mode_batchnorm_batch_of_one():
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = randn_batches(4, 1, 8, seed=11)
    result = rayq.compress(model, batches, schemes=["int8", "w8a8"], threshold=1.0)

    assert model.training
    assert all(module.training for module in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    evaluated = copy.deepcopy(model).eval()
    signal = sum(float(evaluated(x).detach().double().square().sum()) for x in batches)
    denominator = sensitivity_rows(result)[("3", "int8")]["qs_denominator"]
    assert denominator == pytest.approx(signal, rel=1e-12)
    assert not result.model.training


# 11. Bad data: a message naming the value and what is expected; through the CLI, exit code 2
# and no output.

class WithContext(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(8, 8)
        self.head = nn.Linear(12, 4)

    def forward(self, x, context):
        return self.head(torch.cat([self.encoder(x), context], -1))


def test_shape_error_names_module():
    # The head expects 4 context features. The error surfaces in `head`, after `encoder` ran.
    batch = {"x": torch.randn(3, 8), "context": torch.randn(3, 6)}
    with pytest.raises(ModelError) as caught:
        rayq.compress(WithContext().eval(), [batch])
    message = str(caught.value)
    assert "context=tensor of shape (3, 6)" in message
    assert "in module 'head' (Linear: in_features=12, out_features=4" in message


FACTORY_MODULE = "rayq_hard_inputs_model"
FACTORY_SOURCE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x)


def make():
    torch.manual_seed(0)
    return Net().eval()
'''


@pytest.fixture(scope="module")
def cli_folder(tmp_path_factory):
    """Write the factory module and one calibration file per case."""
    folder = tmp_path_factory.mktemp("hard-cli")
    (folder / f"{FACTORY_MODULE}.py").write_text(FACTORY_SOURCE)
    samples = randn_batches(1, 6, 8, seed=12)[0]
    safetensors.torch.save_file({"x": samples}, str(folder / "good.safetensors"))
    safetensors.torch.save_file({"x": torch.zeros(6, 5)}, str(folder / "shape.safetensors"))
    safetensors.torch.save_file({"x": torch.zeros(0, 8)}, str(folder / "none.safetensors"))
    pq.write_table(pa.table({"inputs": samples.tolist()}), str(folder / "columns.parquet"))
    pq.write_table(pa.table({"x": pa.array([], pa.list_(pa.float32()))}),
                   str(folder / "none.parquet"))
    return folder


@pytest.fixture(scope="module")
def local_ray():
    """Start one local Ray instance for the CLI cases, and stop it if this module started it."""
    import ray

    from rayq.driver import cluster

    started = cluster.connect(None, num_cpus=2)
    yield
    if started:
        ray.shutdown()


@pytest.fixture
def factory_importable(cli_folder, monkeypatch):
    monkeypatch.syspath_prepend(str(cli_folder))


def run_compress(cli_folder, output, calibration: str, *flags: str) -> int:
    from rayq.cli.main import main

    return main(["compress", "--model", f"python:{FACTORY_MODULE}:make",
                 "--calibration", str(cli_folder / calibration), "--batch-size", "4",
                 "--workers", "1", "--output", str(output), *flags])


def assert_no_output(output) -> None:
    assert not os.path.exists(output)
    staging = [n for n in os.listdir(os.path.dirname(output)) if n.startswith(f".{output.name}.")]
    assert staging == []


@pytest.mark.parametrize("threshold", ["-1", "NaN", "abc"])
def test_cli_bad_threshold(threshold, cli_folder, factory_importable, tmp_path, capsys):
    output = tmp_path / "out"
    assert run_compress(cli_folder, output, "good.safetensors", "--threshold", threshold) == 2
    err = capsys.readouterr().err
    assert f"threshold: invalid value '{threshold}'" in err
    assert "expected a finite number >= 0" in err
    assert "Traceback" not in err
    assert_no_output(output)


BAD_DATA = {
    # calibration file: (text naming the invalid value, text giving what is expected)
    "columns.parquet": ("unexpected keyword argument 'inputs'; missing required argument 'x'",
                        "Net.forward takes (x)"),
    "shape.safetensors": ("tensor of shape (4, 5)", "'fc' (Linear: in_features=8"),
    "none.parquet": ("none.parquet' contains no sample", "Give at least one sample"),
    "none.safetensors": ("none.safetensors' contains no sample", "Give at least one sample"),
}


@pytest.mark.parametrize("calibration", sorted(BAD_DATA))
def test_cli_bad_data(calibration, local_ray, cli_folder, factory_importable, tmp_path, capsys):
    named, expected = BAD_DATA[calibration]
    output = tmp_path / "out"
    assert run_compress(cli_folder, output, calibration) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert named in err
    assert expected in err
    assert "Traceback" not in err
    assert_no_output(output)
