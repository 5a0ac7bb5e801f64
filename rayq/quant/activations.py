"""Static 8-bit activation quantization calibrated from mergeable histograms.

The histogram has fixed bins that do not depend on the data: a bin per sign, power of two and
1/32 of an octave, from 2**-40 to 2**64. Counts are integers, so histograms computed on any split of
the calibration data add up to exactly the histogram of the whole, in any order. The exact minimum
and maximum ride along. The relative bin width of about 3% bounds how finely the range search can
place a clipping point.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

SUBBINS = 32
MIN_EXPONENT = -40
MAX_EXPONENT = 63
_OCTAVES = MAX_EXPONENT - MIN_EXPONENT + 1
_PER_SIGN = _OCTAVES * SUBBINS
# Layout: [negative bins, largest magnitude first] [zero bin] [positive bins, smallest first].
BIN_COUNT = 2 * _PER_SIGN + 1
QMIN, QMAX = 0, 255

RangeMethod = Literal["mse", "percentile", "minmax"]


def _magnitude_centers() -> torch.Tensor:
    octave = torch.arange(MIN_EXPONENT, MAX_EXPONENT + 1, dtype=torch.float64)
    sub = (torch.arange(SUBBINS, dtype=torch.float64) + 0.5) / SUBBINS
    return (torch.exp2(octave).unsqueeze(1) * (1.0 + sub).unsqueeze(0)).reshape(-1)


_MAGNITUDES = _magnitude_centers()
BIN_CENTERS = torch.cat([-_MAGNITUDES.flip(0), torch.zeros(1, dtype=torch.float64), _MAGNITUDES])


@dataclass
class Histogram:
    """Exact, mergeable statistics of the values one layer input took during calibration."""

    counts: torch.Tensor = field(default_factory=lambda: torch.zeros(BIN_COUNT, dtype=torch.int64))
    minimum: float = float("inf")
    maximum: float = float("-inf")
    nonfinite: int = 0

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def observe(self, values: torch.Tensor) -> None:
        flat = values.detach().reshape(-1).float()
        finite = torch.isfinite(flat)
        bad = int((~finite).sum())
        if bad:
            self.nonfinite += bad
            flat = flat[finite]
        if flat.numel() == 0:
            return
        self.minimum = min(self.minimum, float(flat.min()))
        self.maximum = max(self.maximum, float(flat.max()))
        self.counts += torch.bincount(_bin_index(flat), minlength=BIN_COUNT).cpu()

    def merge(self, other: "Histogram") -> "Histogram":
        return Histogram(
            counts=self.counts + other.counts,
            minimum=min(self.minimum, other.minimum),
            maximum=max(self.maximum, other.maximum),
            nonfinite=self.nonfinite + other.nonfinite,
        )


def _bin_index(values: torch.Tensor) -> torch.Tensor:
    magnitude = values.abs()
    mantissa, exponent = torch.frexp(magnitude)
    # frexp gives magnitude = mantissa * 2**exponent with mantissa in [0.5, 1).
    octave = (exponent - 1).clamp(MIN_EXPONENT, MAX_EXPONENT) - MIN_EXPONENT
    sub = ((mantissa * 2 - 1) * SUBBINS).long().clamp(0, SUBBINS - 1)
    index = octave.long() * SUBBINS + sub
    tiny = magnitude < 2.0**MIN_EXPONENT
    signed = torch.where(values < 0, _PER_SIGN - 1 - index, _PER_SIGN + 1 + index)
    return torch.where(tiny, torch.full_like(signed, _PER_SIGN), signed)


@dataclass(frozen=True)
class ActivationParams:
    """Asymmetric uint8 quantization of one tensor: x ~ (q - zero_point) * scale."""

    scale: float
    zero_point: int

    @property
    def low(self) -> float:
        return (QMIN - self.zero_point) * self.scale

    @property
    def high(self) -> float:
        return (QMAX - self.zero_point) * self.scale


def params_for_range(low: float, high: float) -> ActivationParams:
    """Quantization parameters for [low, high], widened to hold 0 so that 0.0 is exact."""
    low, high = min(low, 0.0), max(high, 0.0)
    if high - low <= 0:
        return ActivationParams(scale=1.0, zero_point=0)
    scale = max((high - low) / (QMAX - QMIN), float(torch.finfo(torch.float32).tiny))
    scale = float(torch.tensor(scale, dtype=torch.float32))
    zero_point = int(min(max(round(QMIN - low / scale), QMIN), QMAX))
    return ActivationParams(scale=scale, zero_point=zero_point)


def calibrate(hist: Histogram, method: RangeMethod = "mse", percentile: float = 99.99) -> ActivationParams:
    """Choose activation quantization parameters from a histogram."""
    if hist.total == 0:
        return ActivationParams(scale=1.0, zero_point=0)
    if method == "minmax":
        return params_for_range(hist.minimum, hist.maximum)
    if method == "percentile":
        return _percentile_range(hist, percentile)
    return _mse_range(hist)


def _percentile_range(hist: Histogram, percentile: float) -> ActivationParams:
    cumulative = hist.counts.cumsum(0).double() / hist.total
    tail = (100.0 - percentile) / 200.0
    low_index = int(torch.searchsorted(cumulative, torch.tensor(tail, dtype=torch.float64)))
    high_index = int(torch.searchsorted(cumulative, torch.tensor(1.0 - tail, dtype=torch.float64)))
    low = max(float(BIN_CENTERS[low_index]), hist.minimum)
    high = min(float(BIN_CENTERS[min(high_index, BIN_COUNT - 1)]), hist.maximum)
    return params_for_range(low, high)


# Fractions of the observed minimum and maximum tried as clipping points by the MSE search.
_MSE_FRACTIONS = torch.cat([torch.logspace(-2, 0, 48, dtype=torch.float64)])


def _mse_range(hist: Histogram) -> ActivationParams:
    """Pick the clipping range with the least expected squared error.

    The error of a range is the rounding noise of the values inside it plus the squared distance of
    each clipped value to the nearest end, summed over the histogram bins. Zero is exactly
    representable, so a value within half a step of it rounds to 0 and costs its own square. A
    value farther out costs the uniform rounding noise step**2 / 12.
    """
    used = hist.counts > 0
    values = BIN_CENTERS[used].clamp(hist.minimum, hist.maximum)
    counts = hist.counts[used].double()

    low_choices = min(hist.minimum, 0.0) * _MSE_FRACTIONS
    high_choices = max(hist.maximum, 0.0) * _MSE_FRACTIONS
    low = low_choices.view(-1, 1, 1)
    high = high_choices.view(1, -1, 1)
    step = (high - low) / (QMAX - QMIN)

    inside = (values >= low) & (values <= high)
    clipped = values.clamp(min=low, max=high)
    clip_error = ((values - clipped).pow(2) * counts).sum(-1)
    noise = torch.where(values.abs() < step / 2, values.square(), step.square() / 12.0)
    round_error = (inside.double() * noise * counts).sum(-1)
    error = clip_error + round_error

    flat = int(torch.argmin(error))
    best_low = float(low_choices[flat // len(high_choices)])
    best_high = float(high_choices[flat % len(high_choices)])
    return params_for_range(best_low, best_high)


class _ActivationRoundThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, scale, zero_point):
        ratio = values.float() / scale
        codes = torch.clamp(torch.round(ratio) + zero_point, QMIN, QMAX)
        ctx.save_for_backward((codes > QMIN) & (codes < QMAX) | (codes == torch.round(ratio) + zero_point))
        return ((codes - zero_point) * scale).to(values.dtype)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None


def fake_quantize_activation(values: torch.Tensor, params: ActivationParams) -> torch.Tensor:
    """Quantize and dequantize an activation; round half to even, computed in float32.

    The result has the input's dtype. Gradients pass straight through inside the range.
    """
    return _ActivationRoundThrough.apply(values, params.scale, params.zero_point)
