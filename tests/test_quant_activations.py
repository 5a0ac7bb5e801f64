"""Activation statistics and ranges: mergeable histograms, range methods, fake quantization."""

import math

import pytest
import torch

from rayq.quant.activations import (
    QMAX,
    QMIN,
    ActivationParams,
    Histogram,
    calibrate,
    fake_quantize_activation,
    params_for_range,
)


def histogram_of(*parts: torch.Tensor) -> Histogram:
    hist = Histogram()
    for part in parts:
        hist.observe(part)
    return hist


def squared_error(values: torch.Tensor, params: ActivationParams) -> float:
    restored = fake_quantize_activation(values, params)
    return float((restored.double() - values.double()).pow(2).sum())


def student_t(seed: int, count: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.distributions.StudentT(2.0).sample((count,))


def test_histogram_merge_is_exact():
    values = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 3
    whole = histogram_of(values)
    pieces = [histogram_of(chunk) for chunk in values.split([1, 2_999, 4_000, 3_000])]
    forward = pieces[0].merge(pieces[1]).merge(pieces[2]).merge(pieces[3])
    backward = pieces[3].merge(pieces[2].merge(pieces[1].merge(pieces[0])))

    for merged in (forward, backward):
        assert torch.equal(merged.counts, whole.counts)
        assert merged.minimum == whole.minimum
        assert merged.maximum == whole.maximum
        assert merged.total == 10_000


def test_histogram_counts_nonfinite_apart():
    values = torch.tensor([1.0, float("nan"), -2.0, float("inf"), float("-inf")])
    hist = histogram_of(values)
    assert hist.nonfinite == 3
    assert hist.total == 2
    assert hist.minimum == -2.0
    assert hist.maximum == 1.0


def test_histogram_of_only_nonfinite_calibrates_safely():
    hist = histogram_of(torch.full((4,), float("nan")))
    for method in ("mse", "percentile", "minmax"):
        params = calibrate(hist, method)
        assert math.isfinite(params.scale)
        assert params.scale > 0


@pytest.mark.parametrize("low, high", [
    (-3.0, 5.0), (0.0, 2.0), (-7.5, 0.0), (0.5, 4.0), (-0.1, 1e4),
])
def test_zero_is_exactly_representable(low, high):
    params = params_for_range(low, high)
    assert QMIN <= params.zero_point <= QMAX
    assert params.scale > 0
    zero = fake_quantize_activation(torch.zeros(3), params)
    assert torch.equal(zero, torch.zeros(3))


def test_params_for_range_covers_range():
    params = params_for_range(-3.0, 5.0)
    # The range is widened by at most half a step at each end when the zero point is rounded.
    assert params.low <= -3.0 + params.scale / 2
    assert params.high >= 5.0 - params.scale / 2


def test_degenerate_range_gets_unit_scale():
    assert params_for_range(0.0, 0.0) == ActivationParams(scale=1.0, zero_point=0)


def test_minmax_keeps_every_value():
    values = torch.randn(5_000, generator=torch.Generator().manual_seed(1))
    params = calibrate(histogram_of(values), "minmax")
    assert params.low <= float(values.min()) + params.scale / 2
    assert params.high >= float(values.max()) - params.scale / 2


def test_positive_inputs_use_zero_point_zero():
    values = torch.rand(1_000, generator=torch.Generator().manual_seed(2))  # like ReLU outputs
    for method in ("mse", "percentile", "minmax"):
        assert calibrate(histogram_of(values), method).zero_point == 0


def test_percentile_clips_outliers():
    values = torch.randn(100_000, generator=torch.Generator().manual_seed(3))
    values[:3] = 1_000.0
    params = calibrate(histogram_of(values), "percentile", percentile=99.9)
    # The 99.9th percentile of |N(0, 1)| is about 3.3, and the histogram bins are about 3% wide.
    assert params.high < 5.0
    assert params.low > -5.0


@pytest.mark.parametrize("seed", range(8))
def test_mse_not_worse_than_minmax(seed):
    # Student-t with 2 degrees of freedom: a few huge values, most near zero. Values within half a
    # step of zero round to exactly 0, so a range model that charges every value step**2 / 12
    # clips far too much here.
    values = student_t(seed, 1 << 18)
    hist = histogram_of(values)
    mse = squared_error(values, calibrate(hist, "mse"))
    minmax = squared_error(values, calibrate(hist, "minmax"))
    assert mse <= minmax


def test_mse_clips_gaussian_tails():
    values = torch.randn(200_000, generator=torch.Generator().manual_seed(4))
    hist = histogram_of(values)
    mse = calibrate(hist, "mse")
    minmax = calibrate(hist, "minmax")
    assert mse.scale < minmax.scale
    assert squared_error(values, mse) < squared_error(values, minmax)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fake_quantize_keeps_dtype(dtype):
    values = torch.linspace(-2, 2, 50).to(dtype)
    out = fake_quantize_activation(values, params_for_range(-2.0, 2.0))
    assert out.dtype == dtype
    assert float((out.float() - values.float()).abs().max()) <= 4.0 / 255  # one step, bf16 rounding


def test_fake_quantize_gradient_stops_outside_range():
    params = params_for_range(-1.0, 1.0)
    values = torch.tensor([-3.0, -0.5, 0.0, 0.7, 2.0], requires_grad=True)
    fake_quantize_activation(values, params).sum().backward()
    assert torch.equal(values.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))
