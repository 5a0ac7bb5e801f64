"""Training objectives: distillation from the float model's outputs, or a loss against labels."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from rayq.errors import ConfigError
from rayq.scoring.batches import float_tensors

LossFunction = Callable[[Any, Any], torch.Tensor]


def distillation_loss(outputs: Any, targets: list[torch.Tensor]) -> torch.Tensor:
    """Return the relative squared error of every float output tensor against the teacher's.

    Error energy over signal energy, as in the sensitivity score, so the loss does not depend on
    the scale of the outputs: 0 is a perfect copy and 1 an error as large as the signal.
    """
    produced = list(float_tensors(outputs))
    if len(produced) != len(targets):
        raise ValueError(f"the model returned {len(produced)} float tensors, the float model "
                         f"{len(targets)}")
    error = sum(((out.float() - ref.to(out.device)) ** 2).sum() for out, ref in zip(produced, targets))
    signal = sum((ref.double() ** 2).sum() for ref in targets)
    return error / max(float(signal), 1e-30)


def _first_float(outputs: Any) -> torch.Tensor:
    for tensor in float_tensors(outputs):
        return tensor.float()
    raise ValueError("the model returned no floating-point tensor to compare with the labels")


def mse_loss(outputs: Any, labels: torch.Tensor) -> torch.Tensor:
    prediction = _first_float(outputs)
    return torch.nn.functional.mse_loss(prediction, labels.to(prediction.device).float().reshape(prediction.shape))


def cross_entropy_loss(outputs: Any, labels: torch.Tensor) -> torch.Tensor:
    logits = _first_float(outputs)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             labels.to(logits.device).long().reshape(-1))


BUILTIN = {"distill": distillation_loss, "mse": mse_loss, "cross_entropy": cross_entropy_loss}


def resolve_loss(name: str) -> LossFunction:
    """Return a built-in loss or import `package.module:function`.

    Importing runs the module's code; the user names the function explicitly on the command line
    or in the call, so no further opt-in is asked for.
    """
    if name in BUILTIN:
        return BUILTIN[name]
    module_name, _, function_name = name.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import the loss function {name!r}: {exc}. Make its module "
                          "importable (on PYTHONPATH) or check the name") from None
    if not callable(function):
        raise ConfigError(f"the loss {name!r} is a {type(function).__name__}, not a function")
    return function
