"""Find the quantizable layers of a model, and record why the other parameterised modules stay float."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from rayq.quant.layout import Layout

logger = logging.getLogger(__name__)

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_RECURRENT = (nn.LSTM, nn.GRU, nn.RNN)


@dataclass(frozen=True)
class WeightRef:
    """One quantizable weight of a layer: its attribute path inside the layer and its row view."""

    path: str
    layout: Layout


@dataclass
class LayerSpec:
    """A quantizable layer: a module whose weights are quantized together and scored as one."""

    name: str
    module_type: str
    weights: list[WeightRef]
    parameter_count: int
    # Schemes this layer cannot take, with the reason.
    unfit: dict[str, str] = field(default_factory=dict)
    # Layers that share a weight tensor with this one; they must take the same scheme.
    tied_with: list[str] = field(default_factory=list)


@dataclass
class FloatModule:
    """A parameterised module that has no quantization rule and stays float."""

    name: str
    module_type: str
    parameter_count: int
    reason: str


def _weight_refs(module: nn.Module) -> tuple[list[WeightRef], bool] | None:
    """Return the quantizable weights of a module and whether its input can be quantized."""
    if isinstance(module, nn.MultiheadAttention):
        names = ["in_proj_weight"] if module.in_proj_weight is not None else [
            "q_proj_weight", "k_proj_weight", "v_proj_weight"]
        names.append("out_proj.weight")
        return [WeightRef(n, Layout()) for n in names], False
    if isinstance(module, _RECURRENT):
        names = [n for n in module._flat_weights_names if n.startswith("weight_")]
        return [WeightRef(n, Layout()) for n in names], False
    if isinstance(module, nn.Embedding):
        return [WeightRef("weight", Layout())], False
    if isinstance(module, _CONV_TRANSPOSE):
        return [WeightRef("weight", Layout("conv_transpose", module.groups))], True
    if isinstance(module, (nn.Linear, *_CONV)):
        return [WeightRef("weight", Layout())], True
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        # transformers' Conv1D (GPT-2 style) stores its weight as (in_features, out_features).
        return [WeightRef("weight", Layout("transposed"))], True
    return None


def _no_input_quantization(module: nn.Module) -> str:
    if isinstance(module, nn.Embedding):
        return "the input is integer indices, not activations"
    return (f"8-bit inputs are supported for Linear and convolution layers only, "
            f"not {type(module).__name__}")


def _is_attention_output(name: str, owners: dict[str, nn.Module]) -> bool:
    parent, _, leaf = name.rpartition(".")
    return leaf == "out_proj" and isinstance(owners.get(parent), nn.MultiheadAttention)


def find_layers(model: nn.Module) -> tuple[list[LayerSpec], list[FloatModule]]:
    """List the quantizable layers in model order, and the parameterised modules kept float."""
    modules = dict(model.named_modules())
    layers: list[LayerSpec] = []
    kept: list[FloatModule] = []
    claimed: set[str] = set()

    for name, module in modules.items():
        if name in claimed or _is_attention_output(name, modules):
            continue
        found = _weight_refs(module)
        if found is None:
            direct = sum(p.numel() for p in module.parameters(recurse=False))
            if direct:
                kept.append(FloatModule(name, type(module).__name__, direct,
                                        f"no quantization rule for {type(module).__name__}"))
            continue
        refs, input_ok = found
        refs = [r for r in refs if module.get_parameter(r.path).is_floating_point()]
        if not refs:
            continue
        for ref in refs:
            owner = ref.path.rpartition(".")[0]
            if owner:
                claimed.add(f"{name}.{owner}" if name else owner)
        count = sum(module.get_parameter(r.path).numel() for r in refs)
        unfit = {} if input_ok else {"w8a8": _no_input_quantization(module)}
        layers.append(LayerSpec(name, type(module).__name__, refs, count, unfit))

    _mark_ties(model, layers)
    return layers, kept


def _mark_ties(model: nn.Module, layers: list[LayerSpec]) -> None:
    owners: dict[int, list[str]] = {}
    for layer in layers:
        module = model.get_submodule(layer.name)
        for ref in layer.weights:
            owners.setdefault(id(module.get_parameter(ref.path)), []).append(layer.name)
    for layer in layers:
        module = model.get_submodule(layer.name)
        tied = set()
        for ref in layer.weights:
            tied.update(owners[id(module.get_parameter(ref.path))])
        tied.discard(layer.name)
        layer.tied_with = sorted(tied)


def weight_of(model: nn.Module, layer: LayerSpec, ref: WeightRef) -> torch.Tensor:
    return model.get_submodule(layer.name).get_parameter(ref.path)
