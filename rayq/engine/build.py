"""Build the compressed module from a float model and a plan."""

from __future__ import annotations

import copy
import logging

from torch import nn

from rayq.model.compressed import QuantizedWeight, attach_input_quantizer, attach_weight
from rayq.model.layers import LayerSpec
from rayq.planning.plan import Decision
from rayq.quant.activations import ActivationParams
from rayq.quant.schemes import FLOAT, SCHEMES
from rayq.scoring.quantized import quantize_weight

logger = logging.getLogger(__name__)


def _split(path: str) -> tuple[str, str]:
    owner, _, attribute = path.rpartition(".")
    return owner, attribute


def build_compressed(float_model: nn.Module, layers: list[LayerSpec], decisions: list[Decision],
                     activations: dict[str, ActivationParams], clip_search: bool = True) -> nn.Module:
    """Return a copy of the float model with each planned layer quantized.

    Weights shared between layers get one `QuantizedWeight`, so the tie survives in the copy and
    in the saved form.
    """
    model = copy.deepcopy(float_model)
    by_name = {layer.name: layer for layer in layers}
    shared: dict[int, QuantizedWeight] = {}

    for decision in decisions:
        if decision.scheme == FLOAT:
            continue
        layer = by_name[decision.layer]
        scheme = SCHEMES[decision.scheme]
        module = model.get_submodule(layer.name)
        for ref in layer.weights:
            owner_path, attribute = _split(ref.path)
            owner = module.get_submodule(owner_path) if owner_path else module
            weight = getattr(owner, attribute)
            key = id(weight)
            if key not in shared:
                q = quantize_weight(weight, ref.layout, scheme.weights, clip_search)
                shared[key] = QuantizedWeight(scheme.name, ref.layout, q.shape, q.dtype, q.codes, q.scales)
            attach_weight(owner, attribute, shared[key])
        if scheme.quantize_input:
            attach_input_quantizer(module, activations[layer.name])
    return model
