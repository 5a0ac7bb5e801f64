"""Quantization sensitivity (QS): the one-pass method against a layer-by-layer reference, exact
merging of partial results, memory use of the scoring pass and degenerate scores."""

import copy
import gc
import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import rayq
from rayq.engine.compress import Scores, prepare
from rayq.planning.plan import make_plan
from rayq.quant.activations import calibrate
from rayq.quant.schemes import SCHEMES, by_compression
from rayq.scoring.quantized import WeightBank
from rayq.scoring.sensitivity import (
    LayerSums,
    gather_activation_stats,
    merge_stats,
    qs_value,
    reduce_sums,
    score_batches,
)

ALL_SCHEMES = ["int4", "w8a8", "int8"]


pytestmark = pytest.mark.usefixtures("one_thread")


class CustomLinear(nn.Linear):
    """A Linear subclass, which must be found and quantized like a Linear."""


class MixedModel(nn.Module):
    """21 quantizable layers of every supported kind, fed from token ids."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.lin1 = CustomLinear(16, 32)
        self.c1_group = nn.Conv1d(32, 32, 3, padding=1, groups=4)
        self.c1_depth = nn.Conv1d(32, 32, 3, padding=1, groups=32)
        self.c1_point = nn.Conv1d(32, 16, 1)
        self.ct1 = nn.ConvTranspose1d(16, 24, 3, padding=1, groups=4)
        self.ct1_depth = nn.ConvTranspose1d(24, 24, 3, padding=1, groups=24)
        self.lin2 = nn.Linear(24, 16)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.gru = nn.GRU(16, 16, batch_first=True)
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.gpt_in = Conv1D(48, 16)
        self.gpt_out = Conv1D(16, 48)
        self.widen = CustomLinear(16, 160)
        self.narrow = nn.Linear(160, 16)  # rows of 160: int4 groups of 128 and 32
        self.c2 = nn.Conv2d(1, 64, 3, padding=1)
        self.c2_group = nn.Conv2d(64, 64, 3, padding=1, groups=4)
        self.c2_depth = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.ct2 = nn.ConvTranspose2d(64, 12, 3, stride=2, groups=2)  # rows of 32 * 9 = 288
        self.c2_out = nn.Conv2d(12, 4, 3, stride=2, padding=1)
        self.head = nn.Linear(20, 10)

    def forward(self, tokens):
        x = self.lin1(self.embed(tokens)).transpose(1, 2)
        x = self.c1_point(torch.relu(self.c1_depth(self.c1_group(x))))
        x = self.ct1_depth(self.ct1(x)).transpose(1, 2)
        x = self.lin2(x)
        x, _ = self.lstm(x)
        x, _ = self.gru(x)
        attended, _ = self.mha(x, x, x)
        x = self.norm(x + attended)
        x = x + self.gpt_out(nn.functional.gelu(self.gpt_in(x)))
        x = x + self.narrow(torch.relu(self.widen(x)))
        image = self.c2_depth(torch.relu(self.c2_group(self.c2(x.unsqueeze(1)))))
        image = self.c2_out(self.ct2(image))
        return self.head(torch.cat([x.mean(1), image.mean((2, 3))], dim=1))


def token_batches(count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50, (3, 12), generator=generator) for _ in range(count)]


def mixed_model() -> nn.Module:
    torch.manual_seed(0)
    return MixedModel().eval()


# The reference below quantizes weights with its own code, written from the scheme definitions:
# one row per output channel, groups of consecutive row elements, scale = absmax / qmax in float32.

def weight_paths(module: nn.Module) -> list[str]:
    if isinstance(module, nn.MultiheadAttention):
        return ["in_proj_weight", "out_proj.weight"]
    if isinstance(module, (nn.LSTM, nn.GRU)):
        return [name for name, _ in module.named_parameters() if name.startswith("weight_")]
    return ["weight"]


def layer_kind(module: nn.Module) -> str:
    if isinstance(module, Conv1D):
        return "transposed"
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d)):
        return "conv_transpose"
    return "rows"


def output_channel_rows(weight: torch.Tensor, kind: str, groups: int) -> torch.Tensor:
    if kind == "transposed":
        return weight.t().contiguous()
    if kind == "rows":
        return weight.reshape(weight.shape[0], -1)
    in_per_group = weight.shape[0] // groups
    return torch.stack([weight[g * in_per_group:(g + 1) * in_per_group, j].reshape(-1)
                        for g in range(groups) for j in range(weight.shape[1])])


def weight_from_rows(rows: torch.Tensor, like: torch.Tensor, kind: str,
                     groups: int) -> torch.Tensor:
    if kind == "transposed":
        return rows.t().contiguous()
    if kind == "rows":
        return rows.reshape(like.shape)
    weight = torch.empty_like(like)
    in_per_group, out_per_group = like.shape[0] // groups, like.shape[1]
    for g in range(groups):
        for j in range(out_per_group):
            block = rows[g * out_per_group + j].reshape(in_per_group, *like.shape[2:])
            weight[g * in_per_group:(g + 1) * in_per_group, j] = block
    return weight


def reference_dequantize(weight: torch.Tensor, kind: str, groups: int, scheme: str) -> torch.Tensor:
    fmt = SCHEMES[scheme].weights
    rows = output_channel_rows(weight.detach().float(), kind, groups)
    width = rows.shape[1] if fmt.group_size is None else min(fmt.group_size, rows.shape[1])
    restored = torch.empty_like(rows)
    for start in range(0, rows.shape[1], width):
        block = rows[:, start:start + width]
        absmax = block.abs().amax(dim=1, keepdim=True)
        scale = torch.where(absmax > 0, absmax / fmt.qmax, torch.ones_like(absmax))
        codes = torch.clamp(torch.round(block / scale), -fmt.qmax, fmt.qmax)
        restored[:, start:start + width] = codes * scale
    return weight_from_rows(restored, weight, kind, groups).to(weight.dtype)


def reference_fake_quantize(values: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    codes = torch.clamp(torch.round(values.float() / scale) + zero_point, 0, 255)
    return ((codes - zero_point) * scale).to(values.dtype)


def floating_tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in floating_tensors(item)]
    return []


def record_calls(model: nn.Module, names: list[str], batches: list) -> dict[str, list]:
    """Record (args, kwargs, float output) of every call of the named layers."""
    calls: dict[str, list] = {name: [] for name in names}

    def recorder(name):
        def hook(module, args, kwargs, output):
            # deepcopy keeps aliasing: MultiheadAttention's query, key and value stay one tensor.
            calls[name].append(copy.deepcopy((args, kwargs, output)))
        return hook

    handles = [model.get_submodule(n).register_forward_hook(recorder(n), with_kwargs=True)
               for n in names]
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for handle in handles:
        handle.remove()
    return calls


def positions(tensor: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """(positions, features) view of an output: convolutions keep features in dim 1."""
    if isinstance(layer, nn.modules.conv._ConvNd) and tensor.dim() >= 3:
        tensor = tensor.movedim(1, -1)
    return tensor.reshape(-1, tensor.shape[-1])


def reference_qs(model: nn.Module, name: str, scheme: str, calls: list, input_params,
                 normalization: str = "energy") -> float:
    """Run one layer alone on its recorded float inputs with dequantized weights."""
    layer = copy.deepcopy(model.get_submodule(name))
    kind, groups = layer_kind(layer), getattr(layer, "groups", 1)
    with torch.no_grad():
        for path in weight_paths(layer):
            weight = layer.get_parameter(path)
            weight.copy_(reference_dequantize(weight, kind, groups, scheme))

    error = signal = 0.0
    with torch.no_grad():
        for args, kwargs, output in calls:
            if SCHEMES[scheme].quantize_input:
                args = (reference_fake_quantize(args[0], *input_params), *args[1:])
            quantized = floating_tensors(layer(*args, **kwargs))
            for out, ref in zip(quantized, floating_tensors(output), strict=True):
                if normalization == "position":
                    rows, ref_rows = positions(out.double(), layer), positions(ref.double(), layer)
                    for row, ref_row in zip(rows, ref_rows, strict=True):
                        row_error = float((row - ref_row).pow(2).sum())
                        if row_error:
                            error += row_error / float(ref_row.pow(2).sum())
                    signal += len(ref_rows)
                else:
                    error += float((out.double() - ref.double()).pow(2).sum())
                    signal += float(ref.double().pow(2).sum())
    return error / signal


@pytest.mark.parametrize("normalization", ["energy", "position"])
def test_one_pass_qs_matches_layer_by_layer_reference(normalization):
    model = mixed_model()
    batches = token_batches(3)
    result = rayq.compress(model, batches, threshold=0.005, schemes=ALL_SCHEMES, clip_search=False,
                           qs_normalization=normalization)
    rows = result.sensitivity.to_pylist()
    names = sorted({row["layer"] for row in rows})
    assert len(names) >= 20
    assert "mha.out_proj" not in names  # part of the attention layer, scored with it

    calls = record_calls(model, names, batches)
    compared = 0
    for row in rows:
        if not row["fits"]:
            continue
        params = (row["input_scale"], row["input_zero_point"])
        expected = reference_qs(model, row["layer"], row["scheme"], calls[row["layer"]], params,
                                normalization)
        # Both sides run the same float32 layer arithmetic, and only the order of float64 sums
        # differs (measured: equal to 2e-16).
        assert row["qs"] == pytest.approx(expected, rel=1e-6), (row["layer"], row["scheme"])
        assert row["calls"] == len(calls[row["layer"]])
        compared += 1
    assert compared == 3 * len(names) - 4  # w8a8 does not fit Embedding, LSTM, GRU, attention


def test_module_types_in_sensitivity_table():
    result = rayq.compress(mixed_model(), token_batches(1), schemes=["int8"])
    types = {row["layer"]: row["module_type"] for row in result.sensitivity.to_pylist()}
    assert types["lin1"] == "CustomLinear"
    assert types["gpt_in"] == "Conv1D"
    assert types["ct2"] == "ConvTranspose2d"
    assert types["mha"] == "MultiheadAttention"


def score_in_parts(prepared, schemes, parts: list[list[tuple[int, torch.Tensor]]],
                   per_position: bool = False):
    """Score disjoint shares of the batches as separate workers would, then merge."""
    stats = merge_stats([gather_activation_stats(prepared.model, prepared.layers, part)
                         for part in reversed(parts)])
    activations = {name: calibrate(hist) for name, hist in stats.items()}
    partials = {}
    for part in parts:
        bank = WeightBank(prepared.model, prepared.layers, by_compression(schemes))
        partials.update(score_batches(prepared.model, prepared.layers, by_compression(schemes),
                                      bank, activations, part, per_position=per_position))
    return stats, activations, reduce_sums(partials, prepared.layers)


@pytest.mark.parametrize("per_position", [False, True])
def test_split_batches_give_identical_scores(per_position):
    prepared = prepare(mixed_model())
    indexed = list(enumerate(token_batches(6, seed=1)))
    whole_stats, whole_params, whole = score_in_parts(prepared, ALL_SCHEMES, [indexed], per_position)
    split_stats, split_params, split = score_in_parts(
        prepared, ALL_SCHEMES, [indexed[4:], indexed[:1], indexed[1:4]], per_position)

    assert whole_stats.keys() == split_stats.keys()
    for name in whole_stats:
        assert torch.equal(whole_stats[name].counts, split_stats[name].counts)
        assert whole_stats[name].minimum == split_stats[name].minimum
        assert whole_stats[name].maximum == split_stats[name].maximum
    assert whole_params == split_params

    # Bitwise equality, not approximate: partial sums are reduced in global batch order.
    for name, sums in whole.items():
        assert split[name].calls == sums.calls
        assert split[name].denominator == sums.denominator
        assert split[name].numerators == sums.numerators

    layers, float_modules = prepared.layers, prepared.kept
    whole_scores = Scores(layers, float_modules, whole, whole_params, ALL_SCHEMES).layer_scores()
    split_scores = Scores(layers, float_modules, split, split_params, ALL_SCHEMES).layer_scores()
    assert whole_scores == split_scores
    for threshold in (0.0, 1e-4, 1e-3, 5e-3, 3e-2):
        assert (make_plan(whole_scores, ALL_SCHEMES, threshold)
                == make_plan(split_scores, ALL_SCHEMES, threshold))


def live_activation_tensors(numel: int) -> int:
    """Count distinct storages of live tensors with exactly `numel` elements."""
    storages = set()
    for obj in gc.get_objects():
        # type() rather than isinstance(), because isinstance reads __class__ and some lazy
        # module proxies emit a deprecation warning on that read.
        if issubclass(type(obj), torch.Tensor) and obj.numel() == numel:
            storages.add(obj.untyped_storage().data_ptr())
    return len(storages)


def peak_live_activations(model: nn.Sequential, numel: int, run) -> int:
    """Return the maximum count of activation-sized tensors alive at calls of the last layer.

    By then every earlier layer has been scored, so inputs kept by the scorer would be alive.
    """
    peak = 0

    def count(module, args):
        nonlocal peak
        peak = max(peak, live_activation_tensors(numel))

    handle = model[-1].register_forward_pre_hook(count)
    try:
        run()
    finally:
        handle.remove()
    return peak


def test_scoring_does_not_keep_layer_inputs():
    depth, rows, width = 16, 24, 96
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)]).eval()
    prepared = prepare(model)
    schemes = by_compression(ALL_SCHEMES)
    bank = WeightBank(prepared.model, prepared.layers, schemes)
    batches = [(0, torch.randn(rows, width))]
    stats = gather_activation_stats(prepared.model, prepared.layers, batches)
    activations = {name: calibrate(hist) for name, hist in stats.items()}

    def score():
        score_batches(prepared.model, prepared.layers, schemes, bank, activations, batches)

    peak = peak_live_activations(prepared.model, rows * width, score)
    # Measured 4: the batch, the last layer's input, its float output and its quantized input
    # (w8a8). A scorer that kept every layer's input would reach `depth`.
    assert peak <= 6

    # The measurement itself can see kept inputs: a hook that keeps them reaches `depth`.
    retained_inputs = []
    handles = [layer.register_forward_hook(lambda m, a, o: retained_inputs.append(a[0]))
               for layer in prepared.model]
    try:
        assert peak_live_activations(prepared.model, rows * width, score) >= depth
    finally:
        for handle in handles:
            handle.remove()


class Degenerate(nn.Module):
    """A zero layer, a layer whose float output cancels to 0, and an ordinary layer."""

    def __init__(self):
        super().__init__()
        self.zero = nn.Linear(3, 2)
        self.cancel = nn.Linear(3, 1, bias=False)
        self.plain = nn.Linear(3, 2)
        with torch.no_grad():
            self.zero.weight.zero_()
            self.zero.bias.zero_()
            # 1 - 0.5 - 0.5 is exactly 0 in float. Quantized, -0.5 rounds half to even to a code
            # that is not half the code of 1, so the quantized output is not 0.
            self.cancel.weight.copy_(torch.tensor([[1.0, -0.5, -0.5]]))

    def forward(self, x):
        return self.zero(x), self.cancel(x), self.plain(x)


def test_degenerate_scores():
    result = rayq.compress(Degenerate().eval(), [torch.ones(2, 3)], threshold=0.5,
                           schemes=["int4", "int8"])
    qs = {(row["layer"], row["scheme"]): row["qs"] for row in result.sensitivity.to_pylist()}
    plan = {row["layer"]: row for row in result.plan.to_pylist()}

    assert qs[("zero", "int4")] == 0.0
    assert qs[("zero", "int8")] == 0.0
    assert qs[("cancel", "int4")] == math.inf
    assert qs[("cancel", "int8")] == math.inf
    assert plan["cancel"]["scheme"] == "float"
    assert all(not math.isnan(v) for v in qs.values())


@pytest.mark.parametrize("numerator, denominator, expected", [
    (0.0, 0.0, 0.0), (0.0, 2.0, 0.0), (1.0, 0.0, math.inf), (1.0, 4.0, 0.25), (8.0, 2.0, 4.0),
])
def test_qs_value_cases(numerator, denominator, expected):
    assert qs_value(numerator, denominator) == expected


def test_qs_value_keeps_nan():
    assert math.isnan(qs_value(math.nan, 1.0))
    assert math.isnan(qs_value(1.0, math.nan))


def test_reduce_order_is_batch_order():
    # Floating-point addition is not associative: 1 + 1e16 rounds to 1e16. Batches arrive from
    # workers in any order, and the reduction must add them in batch index order.
    prepared = prepare(nn.Sequential(nn.Linear(4, 4)).eval())
    values = {2: -1e16, 1: 1e16, 0: 1.0}  # inserted in reverse batch order
    partials = {index: {"0": LayerSums(calls=1, denominator=1.0, numerators={"int8": value})}
                for index, value in values.items()}
    totals = reduce_sums(partials, prepared.layers)
    # In batch order the sum is 0.0, where reverse order would give 1.0.
    assert totals["0"].numerators["int8"] == (1.0 + 1e16) + -1e16
    assert totals["0"].calls == 3


def test_position_normalization_sees_error_hidden_by_massive_outputs():
    """One token per sequence carries an output 1000 times larger and quantizes exactly.

    The energy QS is then dominated by that token and looks tiny, while the position QS is the
    mean relative error over all tokens, as a reference computed token by token shows.
    """
    torch.manual_seed(0)
    layer = nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        # Column 0 holds each row's absmax, so int4 (one group of 128) represents it exactly.
        layer.weight[:, 0] = 2 * layer.weight.abs().amax(dim=1)
    batches = []
    for _ in range(3):
        tokens = torch.randn(4, 32, 128)
        tokens[:, 0, :] = 0.0
        tokens[:, 0, 0] = 1000.0  # the massive token reads only the exact column
        batches.append(tokens)
    model = nn.Sequential(layer)

    scores = {}
    for normalization in ("energy", "position"):
        result = rayq.compress(model, batches, schemes=["int4"], clip_search=False,
                               qs_normalization=normalization)
        scores[normalization] = result.sensitivity.to_pylist()[0]["qs"]

    quantized = reference_dequantize(layer.weight.detach(), "rows", 1, "int4")
    ratios = []
    for tokens in batches:
        reference = tokens.double() @ layer.weight.detach().double().T
        error = tokens.double() @ quantized.double().T - reference
        ratios.append(error.pow(2).sum(-1) / reference.pow(2).sum(-1))
    ratios = torch.cat([r.reshape(-1) for r in ratios])
    assert float(ratios.reshape(3 * 4, 32)[:, 0].abs().max()) == 0.0
    # The layer runs in float32 in rayq and float64 here; 1e-4 covers that rounding.
    assert scores["position"] == pytest.approx(float(ratios.mean()), rel=1e-4)
    assert scores["energy"] < scores["position"] / 100


def test_position_normalization_degenerate_positions():
    """A position whose output is zero: no error gives 0, an error over it gives +inf."""
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]))
    exact = [torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 5.0, 5.0]])]
    result = rayq.compress(nn.Sequential(layer), exact, schemes=["int8"],
                           qs_normalization="position")
    assert result.sensitivity.to_pylist()[0]["qs"] == 0.0

    # 1 + 2 * 0.125 - 1.25 is exactly 0, but int8 codes 102, 13 and -127 (scale 1.25 / 127) sum
    # to one step: an error over a zero output.
    zero_output = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        zero_output.weight.copy_(torch.tensor([[1.0, 0.125, -1.25]]))
    lost = [torch.tensor([[1.0, 2.0, 1.0]])]
    result = rayq.compress(nn.Sequential(zero_output), lost, schemes=["int8"], clip_search=False,
                           qs_normalization="position")
    assert result.sensitivity.to_pylist()[0]["qs"] == math.inf


class _PlainEmbeddingModel(nn.Module):
    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.embed = embedding
        self.head = nn.Linear(16, 4)

    def forward(self, tokens):
        return self.head(self.embed(tokens))


class _EmbeddingSubclass(nn.Embedding):
    """Scored through its own forward, since only a plain nn.Embedding takes the lookup path."""


def test_embedding_lookup_scores_equal_whole_table_scores():
    torch.manual_seed(3)
    plain = _PlainEmbeddingModel(nn.Embedding(50, 16)).eval()
    general = copy.deepcopy(plain)
    general.embed = _EmbeddingSubclass(50, 16)
    general.embed.load_state_dict(plain.embed.state_dict())
    batches = token_batches(3)

    def scores(model):
        rows = rayq.compress(model, batches, schemes=["int4", "int8"]).sensitivity.to_pylist()
        return {(r["layer"], r["scheme"]): r["qs"] for r in rows if r["layer"] == "embed"}

    lookup, whole = scores(plain), scores(general)
    assert len(lookup) == 2 and all(value > 0 for value in lookup.values())
    # The looked-up rows are the same float32 values either way, so the sums are bit for bit equal.
    assert lookup == whole


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("own", [True, False])
def test_difference_equals_widened_subtraction(dtype, own):
    from rayq.scoring.sensitivity import _difference

    generator = torch.Generator().manual_seed(4)
    ref = torch.randn(64, 33, generator=generator).to(dtype)
    out = (ref.float() + 0.01 * torch.randn(64, 33, generator=generator)).to(dtype)
    before = out.clone()
    expected = out.float() - ref.float()

    difference = _difference(out, ref, own)
    assert difference.dtype == torch.float32
    assert torch.equal(difference, expected)
    if not own:
        assert torch.equal(out, before)


def test_outputs_sharing_memory_are_not_overwritten():
    from rayq.scoring.sensitivity import _owned

    output = torch.randn(2, 5, 4)
    last_step = output[:, -1]  # a view, as an RNN's final state can be
    fresh = torch.randn(3)
    reference = [torch.randn(2, 5, 4), torch.randn(2, 4), fresh]
    assert _owned([output, last_step, fresh.clone()], reference) == [False, False, True]
    assert _owned([reference[0]], reference) == [False]
