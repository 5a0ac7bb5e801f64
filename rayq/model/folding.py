"""BatchNorm folding: the output-preserving transformation applied before scoring.

An eval-mode BatchNorm right after a convolution is an affine map per channel, so it can be
merged into the convolution's weight and bias. Folding is applied only when the convolution's
output feeds nothing but that BatchNorm, which is read off a `torch.fx` trace; a model that
cannot be traced keeps its BatchNorms, and a warning is logged.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def find_foldable(model: nn.Module) -> list[tuple[str, str]]:
    """Return (convolution, BatchNorm) name pairs that can be folded."""
    if not any(isinstance(m, _NORM) for m in model.modules()):
        return []
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # tracing fails on data-dependent control flow; folding is optional
        logger.warning("BatchNorm folding skipped: the model cannot be traced by torch.fx (%s)", exc)
        return []

    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _NORM):
            continue
        source = node.args[0] if node.args else None
        if getattr(source, "op", None) != "call_module":
            continue
        conv = modules.get(source.target)
        if isinstance(conv, _CONV) and len(source.users) == 1 and _foldable(modules[node.target], conv):
            pairs.append((source.target, node.target))
    return pairs


def _foldable(norm: nn.Module, conv: nn.Module) -> bool:
    return (norm.track_running_stats and norm.running_mean is not None
            and norm.num_features == conv.out_channels)


def fold(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Fold each BatchNorm into its convolution in place and replace it with `nn.Identity`."""
    for conv_name, norm_name in pairs:
        conv = model.get_submodule(conv_name)
        norm = model.get_submodule(norm_name)
        with torch.no_grad():
            _fold_into(conv, norm)
        parent_name, _, leaf = norm_name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, nn.Identity())
        logger.debug("folded %s into %s", norm_name, conv_name)


def _fold_into(conv: nn.Module, norm: nn.Module) -> None:
    # Computed in float64 so the folded layer matches conv + BatchNorm to float rounding.
    weight = conv.weight.double()
    inv_std = torch.rsqrt(norm.running_var.double() + norm.eps)
    gamma = norm.weight.double() if norm.weight is not None else torch.ones_like(inv_std)
    beta = norm.bias.double() if norm.bias is not None else torch.zeros_like(inv_std)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(inv_std)

    factor = gamma * inv_std
    shape = (-1,) + (1,) * (weight.dim() - 1)
    conv.weight.copy_((weight * factor.view(shape)).to(conv.weight.dtype))
    new_bias = (bias - norm.running_mean.double()) * factor + beta
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype))
    else:
        conv.bias.copy_(new_bias.to(conv.bias.dtype))


def mark_folded_structure(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Give a fresh float model the structure of a folded one (Identity in place of BatchNorm,
    a bias on the convolution), so a saved state dict loads into it."""
    for conv_name, norm_name in pairs:
        conv = model.get_submodule(conv_name)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype,
                                                 device=conv.weight.device))
        parent_name, _, leaf = norm_name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, nn.Identity())
