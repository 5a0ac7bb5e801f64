"""Symmetric weight quantization on a row-major view of a weight tensor.

Every scheme sees a weight as a matrix of rows (one row per output channel, embedding row or
gate row) and quantizes each row in groups of consecutive elements, one float32 scale per group.
Rounding is round-half-to-even (`torch.round`) everywhere, in scoring, in the compressed module,
in fine-tuning and in export, so the paths agree bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# The smallest normal float32. A scale below it would lose precision or flush to zero.
MIN_SCALE = torch.finfo(torch.float32).tiny

# Clipping factors tried per group: the scale is factor * absmax / qmax, and the factor with the
# least squared reconstruction error wins. 1.0 (plain absmax) is always a candidate.
CLIP_FACTORS = (1.0, 0.98, 0.96, 0.94, 0.92, 0.9, 0.88, 0.85, 0.82, 0.8, 0.75, 0.7)


@dataclass(frozen=True)
class WeightFormat:
    """How one weight scheme stores a row: bits, integer limit and group width (None: whole row)."""

    bits: int
    qmax: int
    group_size: int | None

    def group_width(self, columns: int) -> int:
        if self.group_size is None:
            return columns
        return min(self.group_size, columns)

    def scale_count(self, columns: int) -> int:
        width = self.group_width(columns)
        return -(-columns // width)

    def code_bytes(self, rows: int, columns: int) -> int:
        """Bytes of the stored integer codes for a (rows, columns) matrix."""
        if self.bits == 4:
            return rows * (-(-columns // 2))
        return rows * columns


INT8_WEIGHTS = WeightFormat(bits=8, qmax=127, group_size=None)
INT4_WEIGHTS = WeightFormat(bits=4, qmax=7, group_size=128)


def _grouped(rows: torch.Tensor, width: int) -> torch.Tensor:
    """Reshape (R, C) to (R, G, width), padding the last group with zeros."""
    count, columns = rows.shape
    padded = -(-columns // width) * width
    if padded != columns:
        rows = torch.nn.functional.pad(rows, (0, padded - columns))
    return rows.reshape(count, padded // width, width)


def _round_codes(groups: torch.Tensor, scales: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(groups / scales.unsqueeze(-1)), -qmax, qmax)


# Elements of one slice of rows in the clipping search and in rounding. Slices of about a megabyte
# stay in the processor's cache through the dozen passes per factor, and bound the scratch memory.
SEARCH_CHUNK = 1 << 18


def choose_scales(rows: torch.Tensor, fmt: WeightFormat, search: bool = True) -> torch.Tensor:
    """Compute float32 scales of shape (R, G) for a float (R, C) matrix.

    A group of zeros gets scale 1.0, so its codes are zeros and it dequantizes to exact zeros.
    With `search`, each group takes the clipping factor with the least squared error.
    """
    width = fmt.group_width(rows.shape[1])
    if not search:
        absmax = _grouped(rows.detach().float(), width).abs().amax(dim=-1)
        return _scales_for(absmax, 1.0, fmt.qmax)
    # Rows are searched a slice at a time: each row's groups are independent of other rows, so
    # slicing changes no result and keeps the scratch tensors small.
    step = _rows_per_slice(rows.shape[1])
    parts = [_search_scales(rows[start:start + step], fmt, width)
             for start in range(0, rows.shape[0], step)]
    if not parts:
        return torch.ones(0, fmt.scale_count(rows.shape[1]), dtype=torch.float32)
    return torch.cat(parts)


def _rows_per_slice(columns: int) -> int:
    return max(1, SEARCH_CHUNK // max(columns, 1))


def _search_scales(rows: torch.Tensor, fmt: WeightFormat, width: int) -> torch.Tensor:
    groups = _grouped(rows.detach().float(), width)
    absmax = groups.abs().amax(dim=-1)
    best = _scales_for(absmax, 1.0, fmt.qmax)
    scratch = torch.empty_like(groups)
    best_error = _group_error(groups, best, fmt.qmax, scratch)
    for factor in CLIP_FACTORS[1:]:
        scales = _scales_for(absmax, factor, fmt.qmax)
        error = _group_error(groups, scales, fmt.qmax, scratch)
        better = error < best_error
        best = torch.where(better, scales, best)
        best_error = torch.where(better, error, best_error)
    return best


def _scales_for(absmax: torch.Tensor, factor: float, qmax: int) -> torch.Tensor:
    scales = (absmax * factor / qmax).clamp_min(MIN_SCALE)
    return torch.where(absmax > 0, scales, torch.ones_like(scales))


def _group_error(groups: torch.Tensor, scales: torch.Tensor, qmax: int,
                 scratch: torch.Tensor) -> torch.Tensor:
    """Squared reconstruction error per group, computed in place in `scratch`.

    The operations are those of `_round_codes` followed by dequantization, so the error belongs
    to exactly the codes that `quantize_rows` will store.
    """
    expanded = scales.unsqueeze(-1)
    torch.div(groups, expanded, out=scratch)
    scratch.round_().clamp_(-qmax, qmax).mul_(expanded).sub_(groups)
    return torch.linalg.vecdot(scratch, scratch)


def quantize_rows(rows: torch.Tensor, scales: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """Return int8 codes of shape (R, C) for a float matrix and its (R, G) scales.

    Rows are rounded a slice at a time, so the float temporaries stay about a megabyte instead
    of several copies of the whole weight.
    """
    count, columns = rows.shape
    width = fmt.group_width(columns)
    codes = torch.empty((count, columns), dtype=torch.int8, device=rows.device)
    step = _rows_per_slice(columns)
    for start in range(0, count, step):
        stop = start + step
        groups = _grouped(rows[start:stop].detach().float(), width)
        part = _round_codes(groups, scales[start:stop], fmt.qmax).to(torch.int8)
        codes[start:stop] = part.reshape(groups.shape[0], -1)[:, :columns]
    return codes


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """Return the float32 (R, C) matrix that int8 codes and their scales represent."""
    columns = codes.shape[1]
    # `codes.float()` is a new tensor, so the scales multiply into it in place.
    groups = _grouped(codes.float(), fmt.group_width(columns))
    return groups.mul_(scales.unsqueeze(-1)).reshape(codes.shape[0], -1)[:, :columns]


class _RoundThrough(torch.autograd.Function):
    """Quantize and dequantize in the forward pass; pass gradients straight through.

    The forward value is exactly `dequantize_rows(quantize_rows(...))`, so a fine-tuned module and
    the module exported from it give the same outputs. Gradients of elements clipped at the integer
    limit are zeroed, as usual for a straight-through estimator.
    """

    @staticmethod
    def forward(ctx, rows, scales, qmax, width):
        columns = rows.shape[1]
        groups = _grouped(rows.float(), width)
        ratio = groups / scales.unsqueeze(-1)
        inside = (ratio.abs() <= qmax + 0.5).reshape(rows.shape[0], -1)[:, :columns]
        ctx.save_for_backward(inside)
        codes = torch.clamp(torch.round(ratio), -qmax, qmax)
        restored = (codes * scales.unsqueeze(-1)).reshape(rows.shape[0], -1)[:, :columns]
        return restored

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None


def fake_quantize_rows(rows: torch.Tensor, scales: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """Return the dequantized float32 matrix, differentiable with a straight-through estimator."""
    return _RoundThrough.apply(rows, scales, fmt.qmax, fmt.group_width(rows.shape[1]))


class _RoundStraightThrough(torch.autograd.Function):
    """`torch.round` in the forward pass, the identity in the backward pass."""

    @staticmethod
    def forward(ctx, values):
        return torch.round(values)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScaleGradient(torch.autograd.Function):
    """The identity in the forward pass; multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, values, factor):
        ctx.factor = factor
        return values.view_as(values)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def fake_quantize_rows_learned_scales(rows: torch.Tensor, scales: torch.Tensor,
                                      fmt: WeightFormat) -> torch.Tensor:
    """Like `fake_quantize_rows`, but differentiable in the scales too (LSQ-style gradient).

    The forward value runs the same operations as `fake_quantize_rows`, so it equals
    `dequantize_rows(quantize_rows(rows, scales))` bit for bit. The scale gradient of an element
    inside the grid is `code - ratio` and of a clipped one `code`, as in learned step size
    quantization (Esser et al., 2020), scaled by 1 / sqrt(elements per group * qmax) so that
    scales and weights move at comparable rates under one learning rate.
    """
    count, columns = rows.shape
    width = fmt.group_width(columns)
    groups = _grouped(rows.float(), width)
    step = _ScaleGradient.apply(scales, 1.0 / math.sqrt(width * fmt.qmax))
    ratio = groups / step.unsqueeze(-1)
    codes = torch.clamp(_RoundStraightThrough.apply(ratio), -fmt.qmax, fmt.qmax)
    return (codes * step.unsqueeze(-1)).reshape(count, -1)[:, :columns]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack int4 codes in [-8, 7] two per byte (low nibble first) into a uint8 (R, ceil(C/2))."""
    rows, columns = codes.shape
    if columns % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    nibbles = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """Invert `pack_int4`, returning int8 codes of shape (R, columns)."""
    codes = torch.empty((packed.shape[0], packed.shape[1] * 2), dtype=torch.int8,
                        device=packed.device)
    # A nibble n in [0, 15] is the two's complement code (n ^ 8) - 8, computed in int8 so that no
    # temporary is wider than the codes.
    codes[:, 0::2] = (packed & 0xF).to(torch.int8)
    codes[:, 1::2] = (packed >> 4).to(torch.int8)
    codes.bitwise_xor_(8).sub_(8)
    return codes[:, :columns].contiguous()
