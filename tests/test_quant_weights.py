"""Weight quantization numerics: scales, codes, int4 groups and packing, row layouts, STE."""

import pytest
import torch

from rayq.quant.layout import Layout
from rayq.quant.schemes import SCHEMES
from rayq.quant.weights import (
    INT4_WEIGHTS,
    INT8_WEIGHTS,
    MIN_SCALE,
    choose_scales,
    dequantize_rows,
    fake_quantize_rows,
    pack_int4,
    quantize_rows,
    unpack_int4,
)
from rayq.scoring.quantized import quantize_weight

FORMATS = {"int8": INT8_WEIGHTS, "int4": INT4_WEIGHTS}


def random_rows(rows: int, columns: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, columns, generator=generator).to(dtype)


def round_trip(rows: torch.Tensor, fmt, search: bool = True):
    scales = choose_scales(rows, fmt, search=search)
    codes = quantize_rows(rows, scales, fmt)
    return scales, codes, dequantize_rows(codes, scales, fmt)


def test_int8_scale_is_row_absmax():
    rows = random_rows(6, 40)
    scales = choose_scales(rows, INT8_WEIGHTS, search=False)
    # Same float32 arithmetic as the rule "scale = absmax / 127", so the match is exact.
    expected = rows.abs().amax(dim=1, keepdim=True) / 127
    assert scales.dtype == torch.float32
    assert scales.shape == (6, 1)
    assert torch.equal(scales, expected)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_codes_stay_in_restricted_range(name):
    fmt = FORMATS[name]
    rows = random_rows(8, 300, seed=1) * 5
    _, codes, _ = round_trip(rows, fmt)
    assert codes.dtype == torch.int8
    assert int(codes.max()) <= fmt.qmax
    assert int(codes.min()) >= -fmt.qmax


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_error_within_half_step(name):
    fmt = FORMATS[name]
    rows = random_rows(5, 256, seed=2)
    scales, _, restored = round_trip(rows, fmt, search=False)
    # Without clipping every element rounds to the nearest grid point: error <= scale / 2, plus
    # float32 rounding of the product (a relative 1e-6 margin).
    step = scales.repeat_interleave(fmt.group_width(256), dim=1)[:, :256]
    assert torch.all((restored - rows).abs() <= step / 2 * (1 + 1e-6))


def test_int4_group_padding():
    # 200 columns: one full group of 128 and a last group of 72 that is padded with zeros.
    rows = random_rows(3, 200, seed=3)
    rows[:, 128:] *= 0.01  # the last group is much smaller than the first
    scales, codes, restored = round_trip(rows, INT4_WEIGHTS, search=False)

    assert scales.shape == (3, 2)
    assert codes.shape == (3, 200)
    assert restored.shape == (3, 200)
    # The padding zeros must not change the last group's scale.
    assert torch.equal(scales[:, 1], rows[:, 128:].abs().amax(dim=1) / 7)
    assert torch.equal(scales[:, 0], rows[:, :128].abs().amax(dim=1) / 7)
    assert torch.all((restored[:, 128:] - rows[:, 128:]).abs() <= scales[:, 1:] / 2 * (1 + 1e-6))


def test_int4_narrow_rows_use_one_group():
    rows = random_rows(4, 40, seed=4)
    scales = choose_scales(rows, INT4_WEIGHTS)
    assert scales.shape == (4, 1)
    assert INT4_WEIGHTS.scale_count(40) == 1
    assert INT4_WEIGHTS.scale_count(129) == 2


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("search", [False, True])
def test_zero_rows_dequantize_to_zero(name, search):
    fmt = FORMATS[name]
    rows = random_rows(4, 150, seed=5)
    rows[1] = 0.0
    rows[3, :] = 0.0
    scales, codes, restored = round_trip(rows, fmt, search=search)

    assert torch.all(scales > 0)
    assert torch.all(torch.isfinite(scales))
    assert torch.all(codes[1] == 0)
    assert torch.equal(restored[1], torch.zeros(150))
    assert torch.equal(restored[3], torch.zeros(150))


def test_tiny_weights_keep_finite_scales():
    # absmax / 127 is below the smallest normal float32 here.
    rows = torch.full((2, 16), 1e-39)
    scales, _, restored = round_trip(rows, INT8_WEIGHTS)
    assert torch.all(scales >= MIN_SCALE)
    assert torch.all(torch.isfinite(restored))


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_clip_search_never_worse(name):
    fmt = FORMATS[name]
    rows = random_rows(16, 256, seed=6)
    rows[:, 0] *= 20  # an outlier per row makes clipping worthwhile
    _, _, plain = round_trip(rows, fmt, search=False)
    _, _, searched = round_trip(rows, fmt, search=True)

    plain_error = (plain - rows).pow(2).sum(dim=1)
    searched_error = (searched - rows).pow(2).sum(dim=1)
    assert torch.all(searched_error <= plain_error)


def test_clip_search_shrinks_outlier_scale():
    # int4 with an outlier: a clipped scale gives far less error than absmax for the other values.
    rows = torch.linspace(-1, 1, 128).repeat(2, 1)
    rows[:, 0] = -1.6
    plain = choose_scales(rows, INT4_WEIGHTS, search=False)
    searched = choose_scales(rows, INT4_WEIGHTS, search=True)
    assert torch.all(searched < plain)


def test_half_weights_get_float32_scales():
    rows = random_rows(4, 64, seed=7, dtype=torch.float16)
    rows[0, :3] = 60000.0  # near the float16 maximum of 65504
    scales, codes, restored = round_trip(rows, INT8_WEIGHTS)
    assert scales.dtype == torch.float32
    assert torch.all(torch.isfinite(restored))
    assert float(restored[0].abs().max()) <= 60000.0 * (1 + 1e-6)


@pytest.mark.parametrize("columns", [1, 2, 7, 128, 201])
def test_pack_int4_round_trip(columns):
    generator = torch.Generator().manual_seed(columns)
    codes = torch.randint(-8, 8, (3, columns), generator=generator, dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, (columns + 1) // 2)
    assert torch.equal(unpack_int4(packed, columns), codes)


def test_pack_int4_low_nibble_first():
    packed = pack_int4(torch.tensor([[1, -1]], dtype=torch.int8))
    assert int(packed[0, 0]) == 0xF1


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_fake_quantize_matches_dequantize(name):
    fmt = FORMATS[name]
    rows = random_rows(5, 200, seed=8)
    scales, _, restored = round_trip(rows, fmt)
    # Fine-tuning and export must agree bit for bit.
    assert torch.equal(fake_quantize_rows(rows, scales, fmt), restored)


def test_fake_quantize_gradient_is_straight_through():
    rows = torch.tensor([[0.1, -0.5, 1.0, 3.0]], requires_grad=True)
    scales = torch.tensor([[1.0 / 127]])  # 3.0 lies far outside the range [-1, 1]
    out = fake_quantize_rows(rows, scales, INT8_WEIGHTS)
    out.sum().backward()
    assert torch.equal(rows.grad, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))


def gather_conv_transpose_rows(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Rows of a ConvTranspose weight written out channel by channel, for comparison."""
    in_per_group, out_per_group = weight.shape[0] // groups, weight.shape[1]
    rows = []
    for group in range(groups):
        for j in range(out_per_group):
            block = weight[group * in_per_group:(group + 1) * in_per_group, j]
            rows.append(block.reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_conv_transpose_rows_are_output_channels(groups):
    torch.manual_seed(0)
    conv = torch.nn.ConvTranspose2d(6, 4 * groups, 3, groups=groups)
    layout = Layout("conv_transpose", groups)
    weight = conv.weight.detach()
    rows = layout.to_rows(weight)

    assert layout.row_count(weight.shape) == conv.out_channels
    assert rows.shape[0] == conv.out_channels
    assert torch.equal(rows, gather_conv_transpose_rows(weight, groups))
    assert torch.equal(layout.from_rows(rows, weight.shape), weight)


def test_conv_transpose_scales_follow_output_channels():
    # 8 input channels, 6 output channels: one scale per output channel, never per input channel.
    torch.manual_seed(0)
    conv = torch.nn.ConvTranspose1d(8, 6, 3, groups=2)
    quantized = quantize_weight(conv.weight.detach(), Layout("conv_transpose", 2), INT8_WEIGHTS,
                                search=False)
    expected = gather_conv_transpose_rows(conv.weight.detach(), 2).abs().amax(dim=1) / 127
    assert quantized.scales.shape == (6, 1)
    assert torch.equal(quantized.scales[:, 0], expected)


def test_transposed_layout_rows_are_output_features():
    weight = random_rows(10, 3, seed=9)  # GPT-2 Conv1D: (in_features, out_features)
    layout = Layout("transposed")
    assert layout.row_count(weight.shape) == 3
    assert torch.equal(layout.to_rows(weight), weight.t())
    assert torch.equal(layout.from_rows(layout.to_rows(weight), weight.shape), weight)


@pytest.mark.parametrize("layout, shape", [
    (Layout(), (12, 5, 3)),
    (Layout("transposed"), (16, 24)),
    (Layout("conv_transpose", 4), (8, 3, 2, 2)),
])
def test_quantize_weight_keeps_shape_and_dtype(layout, shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(10)).to(torch.bfloat16)
    quantized = quantize_weight(weight, layout, INT4_WEIGHTS)
    restored = quantized.dequantize()
    assert restored.shape == weight.shape
    assert restored.dtype == torch.bfloat16
    assert quantized.scales.dtype == torch.float32
    relative = (restored.float() - weight.float()).norm() / weight.float().norm()
    assert relative < 0.2  # int4, one scale per row of at most 24 values: measured 0.07 to 0.08


def test_weight_bytes_count_packed_codes_and_scales():
    # int4: 200 columns pack into 100 bytes and take two float32 scales per row.
    assert SCHEMES["int4"].weight_bytes(rows=3, columns=200) == 3 * 100 + 3 * 2 * 4
    assert SCHEMES["int8"].weight_bytes(rows=3, columns=200) == 3 * 200 + 3 * 4
    assert SCHEMES["int4"].weight_bytes(rows=1, columns=7) == 4 + 4


# Shapes where clipping pays for some rows: int8 only clips a lone outlier in a wide row, where
# the rounding error it saves adds up over thousands of values.
@pytest.mark.parametrize("name, columns", [("int8", 4096), ("int4", 300)])
def test_clip_search_by_slices_equals_whole_matrix(name, columns, monkeypatch):
    import rayq.quant.weights as weights

    rows = random_rows(37, columns, seed=11)
    rows[::5, 3] *= 4
    rows[7] = 0.0
    whole = choose_scales(rows, FORMATS[name])
    # Slices of 2 rows: 19 slices, the last of one row.
    monkeypatch.setattr(weights, "SEARCH_CHUNK", 2 * columns)
    sliced = choose_scales(rows, FORMATS[name])
    assert torch.equal(sliced, whole)
    factors = torch.unique(whole / choose_scales(rows, FORMATS[name], search=False))
    assert len(factors) > 1, factors


def test_int4_bank_codes_are_packed():
    rows = random_rows(6, 301, seed=12)
    quantized = quantize_weight(rows, Layout(), INT4_WEIGHTS)
    assert quantized.stored.dtype == torch.uint8
    assert quantized.stored.shape == (6, 151)
    assert torch.equal(quantized.codes, quantize_rows(rows, quantized.scales, INT4_WEIGHTS))


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_dequantize_rows_at_equals_rows_of_whole_table(name):
    table = random_rows(50, 160, seed=13)
    quantized = quantize_weight(table, Layout(), FORMATS[name])
    index = torch.tensor([3, 3, 0, 49, 17])
    assert torch.equal(quantized.dequantize_rows_at(index), quantized.dequantize()[index])


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_rounding_by_slices_equals_whole_matrix(name, monkeypatch):
    import rayq.quant.weights as weights

    rows = random_rows(37, 300, seed=14)
    scales = choose_scales(rows, FORMATS[name])
    whole = quantize_rows(rows, scales, FORMATS[name])
    monkeypatch.setattr(weights, "SEARCH_CHUNK", 600)  # slices of 2 rows
    sliced = quantize_rows(rows, scales, FORMATS[name])
    assert torch.equal(sliced, whole)
    assert sliced.shape == (37, 300)
