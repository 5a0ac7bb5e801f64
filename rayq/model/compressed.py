"""The compressed model: quantized weights that dequantize on the fly, inside the original module.

Each quantized weight becomes a `torch.nn.utils.parametrize` parametrization, so the layer keeps
its own class and forward (LSTM, MultiheadAttention and custom modules included) and reads a
dequantized weight whenever it accesses the attribute. A parametrization is in one of two states:

- frozen: int8 codes (int4 packed two per byte) and float32 scales; this is what is saved;
- trainable: a float32 latent weight that is rounded onto the same grid in every forward pass,
  with a straight-through gradient, for quantization-aware fine-tuning.

Both states round half to even with the same arithmetic, so freezing a trained module gives
bit-identical outputs.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.utils import parametrize

from rayq.quant.activations import ActivationParams, fake_quantize_activation
from rayq.quant.layout import Layout
from rayq.quant.schemes import SCHEMES
from rayq.quant.weights import (MIN_SCALE, WeightFormat, dequantize_rows, fake_quantize_rows,
                                fake_quantize_rows_learned_scales, pack_int4, quantize_rows,
                                unpack_int4)

logger = logging.getLogger(__name__)

INPUT_SCALE = "rayq_input_scale"
INPUT_ZERO_POINT = "rayq_input_zero_point"


class QuantizedWeight(nn.Module):
    """A parametrization that supplies a layer's weight from integer codes and float32 scales."""

    def __init__(self, scheme: str, layout: Layout, shape: torch.Size, dtype: torch.dtype,
                 codes: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.scheme = scheme
        self.layout = layout
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.columns = int(codes.shape[1])
        self.register_buffer("scales", scales.to(torch.float32).contiguous())
        self.register_buffer("codes", self._pack(codes))
        self.latent: nn.Parameter | None = None

    @property
    def fmt(self) -> WeightFormat:
        return SCHEMES[self.scheme].weights

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        return pack_int4(codes) if self.fmt.bits == 4 else codes.to(torch.int8).contiguous()

    def int_codes(self) -> torch.Tensor:
        if self.codes is None:
            raise RuntimeError("this weight is in training mode; call rayq.freeze(model) first")
        return unpack_int4(self.codes, self.columns) if self.fmt.bits == 4 else self.codes

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        if self.latent is not None and self.learns_scales:
            rows = fake_quantize_rows_learned_scales(self.latent, self.scales, self.fmt)
        elif self.latent is not None:
            rows = fake_quantize_rows(self.latent, self.scales, self.fmt)
        else:
            rows = dequantize_rows(self.int_codes(), self.scales, self.fmt)
        return self.layout.from_rows(rows, self.shape).to(self.dtype)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        # The float weight is not kept: the codes replace it, and an empty tensor is stored as the
        # parametrization's "original".
        return torch.empty(0, dtype=weight.dtype, device=weight.device)

    @property
    def learns_scales(self) -> bool:
        return isinstance(self.scales, nn.Parameter)

    def enable_training(self, learn_scales: bool = False) -> None:
        """Switch to a trainable float32 latent weight that starts at the dequantized value.

        With `learn_scales`, the float32 scales become parameters too; the integer grid stays.
        """
        if self.latent is None:
            rows = dequantize_rows(self.int_codes(), self.scales, self.fmt)
            self.latent = nn.Parameter(rows)
            self.codes = None
        if learn_scales and not self.learns_scales:
            scales = self.scales.detach().clone()
            del self._buffers["scales"]
            self.scales = nn.Parameter(scales)

    def clamp_scales(self) -> None:
        """Keep learned scales positive and normal after an optimizer step."""
        if self.learns_scales:
            with torch.no_grad():
                self.scales.clamp_(min=MIN_SCALE)

    def freeze(self) -> None:
        """Round the latent weight onto the grid and store codes again; scales become buffers."""
        if self.learns_scales:
            scales = self.scales.detach().clone()
            del self._parameters["scales"]
            self.register_buffer("scales", scales)
        if self.latent is None:
            return
        codes = quantize_rows(self.latent.detach(), self.scales, self.fmt)
        self.codes = self._pack(codes)
        self.latent = None

    def extra_repr(self) -> str:
        return f"scheme={self.scheme}, shape={tuple(self.shape)}, dtype={self.dtype}"


def _quantize_input_hook(module: nn.Module, args: tuple) -> tuple | None:
    if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
        return None
    params = ActivationParams(float(getattr(module, INPUT_SCALE)), int(getattr(module, INPUT_ZERO_POINT)))
    return (fake_quantize_activation(args[0], params), *args[1:])


def attach_weight(owner: nn.Module, attribute: str, quantized: QuantizedWeight) -> None:
    parametrize.register_parametrization(owner, attribute, quantized, unsafe=True)


def attach_input_quantizer(module: nn.Module, params: ActivationParams) -> None:
    """Quantize the module's first input with static parameters before every call."""
    module.register_buffer(INPUT_SCALE, torch.tensor(params.scale, dtype=torch.float32))
    module.register_buffer(INPUT_ZERO_POINT, torch.tensor(params.zero_point, dtype=torch.int32))
    module.register_forward_pre_hook(_quantize_input_hook)


def quantized_weights(model: nn.Module) -> list[QuantizedWeight]:
    found = {id(m): m for m in model.modules() if isinstance(m, QuantizedWeight)}
    return list(found.values())


def enable_training(model: nn.Module, learn_scales: bool = False) -> nn.Module:
    """Prepare a compressed model for quantization-aware fine-tuning, in place.

    Quantized weights get float32 latent parameters that stay on the integer grid in every
    forward pass; gradients pass through the rounding (straight-through estimator). With
    `learn_scales`, their float32 scales are trained too, with an LSQ-style gradient.
    """
    for quantized in quantized_weights(model):
        quantized.enable_training(learn_scales)
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Round every latent weight back to integer codes, in place; outputs do not change."""
    for quantized in quantized_weights(model):
        quantized.freeze()
    return model
