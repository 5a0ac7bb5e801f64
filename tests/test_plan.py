"""The plan rule: thresholds, scheme order, degenerate scores, pins and tied weights."""

import math

import pytest

from rayq.errors import ConfigError, RayqError
from rayq.planning.plan import LayerScore, Pin, check_pins, check_threshold, make_plan
from rayq.quant.schemes import FLOAT

ALL_SCHEMES = ["int4", "w8a8", "int8"]


def score(name: str, calls: int = 1, unfit: dict | None = None, tied_with: tuple = (),
          nonfinite_inputs: int = 0, nonfinite_outputs: int = 0, **qs: float) -> LayerScore:
    return LayerScore(name, "Linear", calls, qs, unfit or {}, nonfinite_inputs,
                      nonfinite_outputs, tied_with)


def chosen(decisions) -> dict[str, str]:
    return {d.layer: d.scheme for d in decisions}


@pytest.mark.parametrize("threshold, expected", [
    (0.0, FLOAT), (0.0005, FLOAT), (0.001, "int8"), (0.003, "w8a8"), (0.02, "int4"), (10.0, "int4"),
])
def test_most_compressed_scheme_within_threshold(threshold, expected):
    scores = [score("fc", int4=0.01, w8a8=0.002, int8=0.001)]
    assert chosen(make_plan(scores, ALL_SCHEMES, threshold))["fc"] == expected


def test_only_candidate_schemes_are_used():
    scores = [score("fc", int4=0.0001, int8=0.001)]
    assert chosen(make_plan(scores, ["int8"], 1.0))["fc"] == "int8"


def test_equal_to_threshold_passes():
    assert chosen(make_plan([score("fc", int8=0.005)], ["int8"], 0.005))["fc"] == "int8"


def test_zero_score_passes_threshold_zero():
    # QS 0.0 means identical outputs, which threshold 0 allows.
    assert chosen(make_plan([score("fc", int8=0.0)], ["int8"], 0.0))["fc"] == "int8"


@pytest.mark.parametrize("threshold", [0.0, 1.0, 1e300])
def test_nan_score_never_passes(threshold):
    scores = [score("fc", int4=math.nan, int8=math.nan)]
    decision = make_plan(scores, ["int4", "int8"], threshold)[0]
    assert decision.scheme == FLOAT
    assert "int4" in decision.reason


def test_nan_score_falls_back_to_next_scheme():
    decisions = make_plan([score("fc", int4=math.nan, int8=0.001)], ["int4", "int8"], 0.01)
    assert chosen(decisions)["fc"] == "int8"


def test_infinite_score_stays_float():
    decision = make_plan([score("fc", int8=math.inf)], ["int8"], 1e300)[0]
    assert decision.scheme == FLOAT
    assert "inf" in decision.reason


def test_unreached_layer_stays_float():
    decision = make_plan([score("fc", calls=0)], ["int8"], 1.0)[0]
    assert decision.scheme == FLOAT
    assert "never reached" in decision.reason


def test_nonfinite_inputs_keep_layer_float():
    decision = make_plan([score("fc", nonfinite_inputs=17, int8=0.0)], ["int8"], 1.0)[0]
    assert decision.scheme == FLOAT
    assert "17 non-finite" in decision.reason


def test_unfit_scheme_is_skipped_with_reason():
    scores = [score("emb", unfit={"w8a8": "input is not a single float tensor"}, int8=0.5)]
    decision = make_plan(scores, ["w8a8", "int8"], 0.1)[0]
    assert decision.scheme == FLOAT
    assert "input is not a single float tensor" in decision.reason


@pytest.mark.parametrize("value", [-1, -0.001, math.nan, math.inf, "abc", None, True])
def test_invalid_threshold_is_rejected(value):
    with pytest.raises(ConfigError) as caught:
        check_threshold(value)
    assert repr(value) in str(caught.value) or str(value) in str(caught.value)
    assert isinstance(caught.value, RayqError)


def test_make_plan_rejects_negative_threshold():
    with pytest.raises(ConfigError, match="-1"):
        make_plan([score("fc", int8=0.0)], ["int8"], -1)


def test_threshold_accepts_numeric_text():
    assert check_threshold("0.01") == 0.01
    assert check_threshold(0) == 0.0


def test_pin_to_float_overrides_score():
    pins = [Pin("fc", FLOAT)]
    decision = make_plan([score("fc", int4=0.0)], ["int4"], 1.0, pins)[0]
    assert decision.scheme == FLOAT
    assert "pinned" in decision.reason


def test_pin_to_scheme_ignores_threshold():
    pins = [Pin(r"block\.\d+\.fc", "int4")]
    scores = [score("block.0.fc", int4=0.5, int8=0.001), score("head", int4=0.5, int8=0.001)]
    assert chosen(make_plan(scores, ["int4", "int8"], 0.01, pins)) == {
        "block.0.fc": "int4", "head": "int8"}


def test_pin_to_unfit_scheme_stays_float():
    scores = [score("emb", unfit={"w8a8": "input is not a single float tensor"}, int8=0.001)]
    decision = make_plan(scores, ["w8a8", "int8"], 1.0, [Pin("emb", "w8a8")])[0]
    assert decision.scheme == FLOAT
    assert "does not fit" in decision.reason


def test_pin_matching_nothing_is_rejected():
    with pytest.raises(ConfigError) as caught:
        check_pins([Pin("fc", FLOAT), Pin("decoder.*", "int8")], ["fc", "head"], ["int8"])
    assert "decoder.*" in str(caught.value)
    assert "'fc'" not in str(caught.value)


def test_pin_must_match_whole_name():
    with pytest.raises(ConfigError, match="'fc'"):
        check_pins([Pin("fc", FLOAT)], ["fc1", "fc2"], ["int8"])


def test_invalid_pin_pattern_is_rejected():
    with pytest.raises(ConfigError, match="regular expression"):
        check_pins([Pin("fc(", FLOAT)], ["fc"], ["int8"])


def test_tied_layers_take_least_compressed_choice():
    scores = [
        score("embed", tied_with=("head",), int4=0.001, int8=0.0001),
        score("mid", int4=0.001, int8=0.0001),
        score("head", tied_with=("embed",), int4=0.5, int8=0.001),
    ]
    plan = chosen(make_plan(scores, ["int4", "int8"], 0.01))
    assert plan == {"embed": "int8", "mid": "int4", "head": "int8"}


def test_tied_layer_kept_float_keeps_partner_float():
    scores = [score("embed", tied_with=("head",), int8=0.0001),
              score("head", calls=0, tied_with=("embed",))]
    plan = chosen(make_plan(scores, ["int8"], 0.01))
    assert plan == {"embed": FLOAT, "head": FLOAT}


def test_higher_threshold_never_quantizes_less():
    scores = [score(f"l{i}", int4=0.001 * i, w8a8=0.0005 * i, int8=0.0001 * i)
              for i in range(1, 30)]
    rank = {FLOAT: 3, "int8": 2, "w8a8": 1, "int4": 0}
    previous = None
    for threshold in (0.0, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1.0):
        ranks = [rank[d.scheme] for d in make_plan(scores, ALL_SCHEMES, threshold)]
        if previous is not None:
            assert all(now <= before for now, before in zip(ranks, previous))
        previous = ranks
