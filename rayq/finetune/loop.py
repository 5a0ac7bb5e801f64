"""The fine-tuning loop, the same on one process and on each Ray Train worker.

Worker `rank` of `world` takes calibration batch `(step * world + rank) % batches` at each step,
so together the workers pass over the data in order, and gradients are averaged over the workers
before every optimizer step (data parallelism). The module stays in eval mode while it trains:
dropout is off and normalization statistics stay those of the calibrated model, so a step is
deterministic and a resumed job repeats the steps it lost exactly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rayq.config import FinetuneSettings
from rayq.errors import RunFailedError
from rayq.model.compressed import quantized_weights
from rayq.scoring.batches import Batch, call_model, model_device, to_device

logger = logging.getLogger(__name__)


@dataclass
class TrainingData:
    """Model inputs and, for each, the loss target: the float model's outputs or the labels."""

    batches: list[Batch]
    targets: list[Any]


@dataclass
class LoopHooks:
    """Callbacks and placement that the runner gives the loop. The defaults fit one process."""

    rank: int = 0
    world: int = 1
    average_gradients: Callable[[list[nn.Parameter]], None] = lambda parameters: None
    mean: Callable[[float], float] = lambda value: value
    on_step: Callable[[int, float], None] = lambda step, loss: None
    checkpoint: Callable[[dict], None] = lambda state: None
    before_step: Callable[[int], None] = lambda step: None
    log_steps: bool = True


@dataclass
class LoopState:
    step: int = 0
    history: list[dict] = field(default_factory=list)
    resumed_from: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"step": self.step, "history": self.history, "resumed_from": self.resumed_from}


def total_steps(settings: FinetuneSettings, batch_count: int, world: int) -> int:
    """Return the steps of the job: `steps`, or `epochs` passes shared by `world` workers."""
    if settings.steps is not None:
        return settings.steps
    epochs = settings.epochs if settings.epochs is not None else 1.0
    return max(1, math.ceil(epochs * batch_count / world))


def batch_index(step: int, rank: int, world: int, count: int) -> int:
    return (step * world + rank) % count


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    # The parametrizations' "original" tensors are empty placeholders that no forward pass reads.
    return [p for p in model.parameters() if p.requires_grad and p.numel() > 0]


def make_optimizer(model: nn.Module, settings: FinetuneSettings) -> torch.optim.Optimizer:
    # No weight decay: it would pull latent weights and scales off the grid they were fit to.
    return torch.optim.AdamW(trainable_parameters(model), lr=settings.learning_rate, weight_decay=0.0)


def run_loop(model: nn.Module, optimizer: torch.optim.Optimizer, data: TrainingData,
             loss_function, settings: FinetuneSettings, total: int, state: LoopState,
             hooks: LoopHooks) -> LoopState:
    """Train from `state.step` to `total` steps, checkpointing on the way; return the new state."""
    model.eval()
    parameters = trainable_parameters(model)
    weights = quantized_weights(model)
    device = model_device(model)
    for step in range(state.step, total):
        hooks.before_step(step)
        index = batch_index(step, hooks.rank, hooks.world, len(data.batches))
        optimizer.zero_grad(set_to_none=True)
        outputs = call_model(model, data.batches[index], index)
        loss = loss_function(outputs, to_device(data.targets[index], device))
        if not torch.isfinite(loss):
            raise RunFailedError(f"fine-tuning diverged: the loss at step {step + 1} is "
                                 f"{float(loss)}. Lower the learning rate ({settings.learning_rate}).")
        loss.backward()
        hooks.average_gradients(parameters)
        optimizer.step()
        for quantized in weights:
            quantized.clamp_scales()

        value = hooks.mean(float(loss.detach()))
        state.step = step + 1
        state.history.append({"step": state.step, "loss": value})
        hooks.on_step(state.step, value)
        if hooks.log_steps:
            logger.info("fine-tuning step %d/%d: loss %.6g", state.step, total, value)
        if state.step % settings.checkpoint_every == 0 or state.step == total:
            hooks.checkpoint(state.as_dict())
    return state
