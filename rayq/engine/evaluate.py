"""End-to-end error of a compressed model against the float model on held-out batches."""

from __future__ import annotations

import math
from dataclasses import dataclass


import torch
from torch import nn

from rayq.scoring.batches import Batch, call_model, float_tensors


@dataclass(frozen=True)
class Fidelity:
    """Relative output error (root of error energy over signal energy) and per-sample cosines."""

    relative_error: float
    cosine_mean: float
    cosine_min: float


def reference_outputs(model: nn.Module, batches: list[Batch]) -> list[list[torch.Tensor]]:
    with torch.no_grad():
        return [[t.detach().float().cpu() for t in float_tensors(call_model(model, b))] for b in batches]


class FloatOutputs:
    """The float model's outputs on the held-out batches, computed on first use and then kept.

    Re-planning from a stored table that already contains every plan's error never needs them, so
    `rayq plan` skips the float pass in that case.
    """

    def __init__(self, model: nn.Module, batches: list[Batch]):
        self._model = model
        self._batches = batches
        self._outputs: list[list[torch.Tensor]] | None = None

    def get(self) -> list[list[torch.Tensor]]:
        if self._outputs is None:
            self._outputs = reference_outputs(self._model, self._batches)
        return self._outputs

    @property
    def computed(self) -> bool:
        return self._outputs is not None


def _per_sample_cosines(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    if ref.dim() == 0:
        return torch.empty(0, dtype=torch.float64)
    a = out.double().reshape(out.shape[0], -1)
    b = ref.double().reshape(ref.shape[0], -1)
    dot = (a * b).sum(-1)
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    # Two zero vectors are the same output; one zero vector against a nonzero one is orthogonal.
    both_zero = (a.norm(dim=-1) == 0) & (b.norm(dim=-1) == 0)
    cos = torch.where(norms > 0, dot / norms.clamp_min(1e-300), torch.zeros_like(dot))
    return torch.where(both_zero, torch.ones_like(cos), cos)


def measure(model: nn.Module, batches: list[Batch], references: list[list[torch.Tensor]]) -> Fidelity:
    """Compare the model's outputs on `batches` with the stored float outputs."""
    error = signal = 0.0
    cosines = []
    with torch.no_grad():
        for batch, reference in zip(batches, references):
            outputs = [t.detach().float().cpu() for t in float_tensors(call_model(model, batch))]
            for out, ref in zip(outputs, reference):
                error += float(((out.double() - ref.double()) ** 2).sum())
                signal += float((ref.double() ** 2).sum())
                cosines.append(_per_sample_cosines(out, ref))
    relative = _relative(error, signal)
    every = torch.cat(cosines) if cosines else torch.empty(0)
    if every.numel() == 0:
        return Fidelity(relative, math.nan, math.nan)
    every = every.clamp(-1.0, 1.0)  # rounding can push a cosine of parallel vectors past 1
    return Fidelity(relative, float(every.mean()), float(every.min()))


def _relative(error: float, signal: float) -> float:
    if error == 0.0:
        return 0.0
    if signal == 0.0 or math.isnan(error):
        return math.inf if not math.isnan(error) else math.nan
    return math.sqrt(error / signal)


