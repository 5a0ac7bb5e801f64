"""Calling a model on a calibration batch, and walking the tensors of its output."""

from __future__ import annotations

import inspect
from typing import Any, Iterator

import torch
from torch import nn

from rayq.errors import ModelError

Batch = Any  # a tensor, a tuple of positional arguments, or a dict of keyword arguments

# Exceptions that torch and model code raise for arguments, shapes or dtypes that do not fit.
_MODEL_ERRORS = (TypeError, RuntimeError, ValueError, IndexError)


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _invoke(model: nn.Module, batch: Batch) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def call_model(model: nn.Module, batch: Batch, index: int | None = None) -> Any:
    """Run the model on one batch; a batch the model cannot run is invalid input."""
    batch = to_device(batch, model_device(model))
    try:
        return _invoke(model, batch)
    except _MODEL_ERRORS as exc:
        where = f"calibration batch {index}" if index is not None else "a batch"
        module = _failing_module(model, batch)
        inside = f" in module {module}" if module else ""
        raise ModelError(
            f"the model cannot run on {where} ({describe_batch(batch)}){inside}: {exc}. "
            "Check that the calibration data matches the model's forward arguments and shapes."
        ) from exc


def _failing_module(model: nn.Module, batch: Batch) -> str | None:
    """Run a failed batch again with hooks on every submodule and describe the innermost one
    still running when the error was raised, such as "'fc' (Linear: in_features=8, ...)".

    Returns None when the error comes from the top-level forward or does not happen again.
    """
    names = {id(module): name for name, module in model.named_modules() if name}
    running: list[nn.Module] = []

    # Both hooks return None, so the outputs of the rerun stay as they are.
    def enter(module: nn.Module, args: tuple) -> None:
        running.append(module)

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        running.pop()

    handles = []
    for module in model.modules():
        if id(module) in names:
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))
    try:
        _invoke(model, batch)
    except _MODEL_ERRORS:
        failed = True  # the same error again, so only where it happens matters here
    else:
        failed = False
    finally:
        for handle in handles:
            handle.remove()
    if not failed or not running:
        return None
    module = running[-1]
    details = module.extra_repr()
    kind = f"{type(module).__name__}: {details}" if details else type(module).__name__
    return f"{names[id(module)]!r} ({kind})"


def check_batches(model: nn.Module, batches: list[Batch], run_first: bool = False) -> None:
    """Raise ModelError for the first batch whose arguments the model's forward does not take.

    Only argument names and counts are checked, against the signature of `model.forward`. With
    `run_first`, the first batch also runs through the model, so that a shape error shows up in
    this process before any worker starts.
    """
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # a forward without a Python signature cannot be checked
        signature = None
    if signature is not None:
        for index, batch in enumerate(batches):
            _check_arguments(model, signature, batch, index)
    if run_first and batches:
        with torch.no_grad():
            call_model(model, batches[0], 0)


def _check_arguments(model: nn.Module, signature: inspect.Signature, batch: Batch,
                     index: int) -> None:
    problem = _keyword_problem(signature, batch) if isinstance(batch, dict) else None
    if problem is None:
        try:
            if isinstance(batch, dict):
                signature.bind(**batch)
            elif isinstance(batch, (tuple, list)):
                signature.bind(*batch)
            else:
                signature.bind(batch)
        except TypeError as exc:
            problem = str(exc)
    if problem is None:
        return
    expected = ", ".join(str(p.replace(annotation=p.empty)) for p in signature.parameters.values())
    raise ModelError(
        f"the model cannot run on calibration batch {index} ({describe_batch(batch)}): {problem}. "
        f"{type(model).__name__}.forward takes ({expected}); name the Parquet columns or "
        "safetensors tensors after these arguments."
    )


def _keyword_problem(signature: inspect.Signature, batch: dict) -> str | None:
    """Name every keyword the forward does not take and every required one the batch lacks."""
    parameters = signature.parameters
    open_keywords = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    by_keyword = [name for name, p in parameters.items()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unexpected = [] if open_keywords else [k for k in batch if k not in by_keyword]
    missing = [name for name in by_keyword
               if parameters[name].default is inspect.Parameter.empty and name not in batch]
    problems = []
    if unexpected:
        plural = "s" if len(unexpected) > 1 else ""
        problems.append(f"unexpected keyword argument{plural} " + ", ".join(map(repr, unexpected)))
    if missing:
        plural = "s" if len(missing) > 1 else ""
        problems.append(f"missing required argument{plural} " + ", ".join(map(repr, missing)))
    return "; ".join(problems) or None


def describe_batch(batch: Batch) -> str:
    if isinstance(batch, torch.Tensor):
        return f"tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, dict):
        parts = ", ".join(f"{k}={describe_batch(v)}" for k, v in batch.items())
        return "keyword arguments " + parts
    if isinstance(batch, (tuple, list)):
        return "positional arguments (" + ", ".join(describe_batch(v) for v in batch) + ")"
    return type(batch).__name__


def float_tensors(value: Any) -> Iterator[torch.Tensor]:
    """Yield every floating-point tensor in a nested output, in a fixed order."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield value
    elif isinstance(value, dict):
        for key in value:
            yield from float_tensors(value[key])
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from float_tensors(item)
    elif hasattr(value, "to_tuple"):  # transformers' ModelOutput
        yield from float_tensors(value.to_tuple())


def batch_size(batch: Batch) -> int:
    for tensor in _tensors(batch):
        return int(tensor.shape[0]) if tensor.dim() else 1
    return 1


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
