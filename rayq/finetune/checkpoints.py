"""The checkpoint of a fine-tuning job: module, optimizer and loop state in a local folder.

Tensors go to safetensors and the rest to JSON, so resuming unpickles nothing:
- `model.safetensors`: the training-mode state of the module (latent weights, scales, float
  parameters and buffers);
- `optimizer.safetensors`: the optimizer's per-parameter state, keyed `INDEX/NAME`;
- `state.json`, written last: the step, the loss history and the optimizer's parameter groups.
"""

from __future__ import annotations

import json
import os
from typing import Any

import safetensors.torch
import torch
from torch import nn

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


def save_checkpoint(folder: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> None:
    os.makedirs(folder, exist_ok=True)
    safetensors.torch.save_model(model, os.path.join(folder, MODEL_FILE))
    saved = optimizer.state_dict()
    tensors = {}
    for index, values in saved["state"].items():
        for name, value in values.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{index}/{name}"] = tensor.detach().cpu().contiguous()
    safetensors.torch.save_file(tensors, os.path.join(folder, OPTIMIZER_FILE))
    with open(os.path.join(folder, STATE_FILE), "w") as handle:
        json.dump({**state, "param_groups": saved["param_groups"]}, handle)


def load_checkpoint(folder: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore the module and optimizer in place; return the loop state."""
    with open(os.path.join(folder, STATE_FILE)) as handle:
        state = json.load(handle)
    missing, unexpected = safetensors.torch.load_model(model, os.path.join(folder, MODEL_FILE),
                                                       strict=False, device=_device(model))
    if missing or unexpected:
        raise ValueError(f"checkpoint {folder} does not fit the model: missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    tensors = safetensors.torch.load_file(os.path.join(folder, OPTIMIZER_FILE))
    per_parameter: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        index, name = key.split("/", 1)
        per_parameter.setdefault(int(index), {})[name] = tensor
    optimizer.load_state_dict({"state": per_parameter, "param_groups": state.pop("param_groups")})
    return state


def _device(model: nn.Module) -> str:
    for tensor in model.parameters():
        return str(tensor.device)
    return "cpu"
