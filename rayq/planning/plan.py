"""The plan rule: each layer takes the most compressed scheme whose QS is within the threshold.

Pure functions of stored scores, so re-planning at any threshold needs no model run.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from rayq.errors import ConfigError
from rayq.quant.schemes import FLOAT, SCHEMES, Scheme, by_compression


@dataclass(frozen=True)
class LayerScore:
    """The plan's view of one layer: its calls, QS per scheme and the schemes that do not fit."""

    name: str
    module_type: str
    calls: int
    qs: dict[str, float]
    unfit: dict[str, str]
    nonfinite_inputs: int = 0
    nonfinite_outputs: int = 0
    tied_with: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pin:
    """A user rule: layers whose name fully matches `pattern` take `scheme` (or stay float)."""

    pattern: str
    scheme: str


@dataclass(frozen=True)
class Decision:
    layer: str
    scheme: str
    reason: str


def check_threshold(value: object) -> float:
    """Return the threshold as a float, or raise if it is not a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(str(value))
        except ValueError:
            raise ConfigError(
                f"invalid threshold {value!r}: expected a finite number >= 0, such as 0.005"
            ) from None
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"invalid threshold {value!r}: expected a finite number >= 0, such as 0.005")
    return value


def check_pins(pins: list[Pin], layer_names: list[str], schemes: list[str]) -> None:
    """Raise one error listing every pin that is malformed or matches no layer."""
    problems = []
    for pin in pins:
        try:
            pattern = re.compile(pin.pattern)
        except re.error as exc:
            problems.append(f"pin {pin.pattern!r} is not a valid regular expression: {exc}")
            continue
        if pin.scheme != FLOAT and pin.scheme not in SCHEMES:
            problems.append(f"pin {pin.pattern!r} names unknown scheme {pin.scheme!r}; "
                            f"use float or one of {sorted(SCHEMES)}")
        if not any(pattern.fullmatch(name) for name in layer_names):
            problems.append(f"pin {pin.pattern!r} matches no quantizable layer; "
                            "check the layer names in the sensitivity table")
    if problems:
        raise ConfigError("invalid layer pins", problems)


def _pinned(name: str, pins: list[Pin]) -> Pin | None:
    for pin in pins:
        if re.fullmatch(pin.pattern, name):
            return pin
    return None


def _own_choice(score: LayerScore, schemes: list[Scheme], threshold: float) -> Decision:
    if score.calls == 0:
        return Decision(score.name, FLOAT, "never reached by the calibration data")
    if score.nonfinite_inputs:
        return Decision(score.name, FLOAT,
                        f"{score.nonfinite_inputs} non-finite input values during calibration")
    if score.nonfinite_outputs:
        return Decision(score.name, FLOAT,
                        f"{score.nonfinite_outputs} non-finite float output values during calibration")
    notes = []
    for scheme in schemes:
        if scheme.name in score.unfit:
            notes.append(f"{scheme.name} does not fit: {score.unfit[scheme.name]}")
            continue
        qs = score.qs.get(scheme.name, math.nan)
        if math.isnan(qs):
            notes.append(f"{scheme.name} flagged: quantized output not finite")
            continue
        if qs <= threshold:
            return Decision(score.name, scheme.name, f"QS {qs:.3g} <= threshold {threshold:g}")
        notes.append(f"{scheme.name} QS {qs:.3g} > {threshold:g}")
    return Decision(score.name, FLOAT, "; ".join(notes) or "no candidate scheme")


def make_plan(scores: list[LayerScore], scheme_names: list[str], threshold: float,
              pins: list[Pin] | None = None) -> list[Decision]:
    """Choose a scheme or float for every layer; tied layers share the choice of the strictest."""
    threshold = check_threshold(threshold)
    pins = pins or []
    schemes = by_compression(scheme_names)
    decisions = {}
    for score in scores:
        pin = _pinned(score.name, pins)
        if pin is not None:
            decisions[score.name] = _pin_decision(score, pin)
        else:
            decisions[score.name] = _own_choice(score, schemes, threshold)
    _resolve_ties(scores, decisions)
    return [decisions[s.name] for s in scores]


def _pin_decision(score: LayerScore, pin: Pin) -> Decision:
    if pin.scheme == FLOAT:
        return Decision(score.name, FLOAT, f"pinned to float by {pin.pattern!r}")
    if pin.scheme in score.unfit:
        return Decision(score.name, FLOAT,
                        f"pinned to {pin.scheme} by {pin.pattern!r}, which does not fit: "
                        f"{score.unfit[pin.scheme]}")
    if score.calls == 0 and SCHEMES[pin.scheme].quantize_input:
        return Decision(score.name, FLOAT,
                        f"pinned to {pin.scheme} by {pin.pattern!r}, but never reached by the "
                        "calibration data, so its input has no calibrated range")
    if math.isnan(score.qs.get(pin.scheme, 0.0)):
        return Decision(score.name, FLOAT,
                        f"pinned to {pin.scheme} by {pin.pattern!r}, but flagged: quantized output "
                        "not finite")
    return Decision(score.name, pin.scheme, f"pinned to {pin.scheme} by {pin.pattern!r}")


def _resolve_ties(scores: list[LayerScore], decisions: dict[str, Decision]) -> None:
    """Give every layer of a shared weight the least compressed choice, so it is quantized once."""
    seen: set[str] = set()
    for score in scores:
        if not score.tied_with or score.name in seen:
            continue
        group = [score.name, *[n for n in score.tied_with if n in decisions]]
        seen.update(group)
        choices = [decisions[n].scheme for n in group]
        if len(set(choices)) == 1:
            continue
        strictest = max(choices, key=lambda s: math.inf if s == FLOAT else SCHEMES[s].rank)
        for name in group:
            if decisions[name].scheme != strictest:
                decisions[name] = Decision(
                    name, strictest, f"shares its weight with {', '.join(n for n in group if n != name)}; "
                    f"takes {strictest} so that the tied weight is quantized once")
