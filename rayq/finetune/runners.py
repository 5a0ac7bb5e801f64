"""Carrying out the fine-tuning loop: in the calling process, or as a Ray Train job.

Both runners resume from the latest checkpoint under OUTPUT/checkpoints, so a job that was
interrupted (the command killed, or a Ray Train worker lost) continues from its last checkpoint
instead of from step 0. The in-process runner writes `step-NNNNNNNN` folders itself; the Ray Train
runner lets Ray Train store its `checkpoint_*` folders and snapshot there, and Ray Train restarts
the worker group from the latest one when a worker dies. A job resumes only in the mode that
wrote its checkpoints.
"""

from __future__ import annotations

import logging
import os
import posixpath
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import torch
from torch import nn

from rayq import progress
from rayq.config import FinetuneSettings
from rayq.errors import ConfigError, RunFailedError
from rayq.finetune.checkpoints import STATE_FILE, load_checkpoint, save_checkpoint
from rayq.finetune.loop import (
    LoopHooks,
    LoopState,
    TrainingData,
    make_optimizer,
    run_loop,
)
from rayq.finetune.objective import resolve_loss
from rayq.model.compressed import enable_training
from rayq.storage.location import Location
from rayq.storage.model_io import load_model_files

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
# Checkpoints kept under OUTPUT/checkpoints; older ones are deleted as new ones arrive.
KEEP_CHECKPOINTS = 2


@dataclass
class StudentPayload:
    """The parts a process needs to rebuild the compressed model.

    No module with parametrizations travels, because torch creates their classes at run time and
    pickle cannot find them by name.
    """

    source: dict | None
    module: nn.Module | None
    weights: bytes
    config: dict
    learn_scales: bool

    def build(self) -> nn.Module:
        if self.module is not None:
            float_model = self.module
        else:
            from rayq.sources.models import load_source

            # The user named this source for the job (with --trust-code for a Python factory).
            float_model = load_source(self.source, trust_code=True).module
        student = load_model_files(self.weights, self.config, float_model)
        return enable_training(student, self.learn_scales)


@dataclass
class Trained:
    """The module at the end of training (still in training mode) and the loop's state."""

    model: nn.Module
    state: LoopState
    workers: list[dict]


def _load_state(folder: str, model: nn.Module, optimizer) -> LoopState:
    values = load_checkpoint(folder, model, optimizer)
    return LoopState(values["step"], values["history"], values.get("resumed_from", []))


# In the calling process.

def train_in_process(payload: StudentPayload, data: TrainingData, settings: FinetuneSettings,
                     total: int, checkpoints: Location, fault: dict | None = None) -> Trained:
    """Run the loop here. `fault` is a testing hook: {"step": s} raises before step s (counted
    from 0) in a job that did not start from a checkpoint, as a crash would."""
    model = payload.build()
    optimizer = make_optimizer(model, settings)
    state = LoopState()
    latest = _latest_step_folder(checkpoints)
    if latest is not None:
        with tempfile.TemporaryDirectory() as folder:
            pafs.copy_files(checkpoints.path(latest), folder, source_filesystem=checkpoints.fs)
            try:
                state = _load_state(folder, model, optimizer)
            except (ValueError, KeyError) as exc:
                raise ConfigError(f"the checkpoint {checkpoints.describe(latest)} does not fit "
                                  f"this job: {exc}. Remove {checkpoints.uri} to start over, or "
                                  "choose another output") from None
        state.resumed_from.append(state.step)
        logger.warning("resuming fine-tuning from the checkpoint at step %d in %s", state.step,
                       checkpoints.describe(latest))

    with progress.phase("fine-tuning", total - state.step, unit="steps") as advance:
        hooks = LoopHooks(on_step=lambda step, loss: advance(1),
                          checkpoint=lambda values: _store_step_folder(checkpoints, model, optimizer, values),
                          before_step=lambda step: _inject_fault(fault, latest is None, step))
        run_loop(model, optimizer, data, resolve_loss(settings.loss), settings, total, state, hooks)
    return Trained(model, state, [])


def _inject_fault(fault: dict | None, fresh: bool, step: int) -> None:
    if fault and fresh and step == fault["step"]:
        raise RuntimeError(f"fault injection: the job stops before step {step}")


def _step_folders(checkpoints: Location) -> list[str]:
    selector = pafs.FileSelector(checkpoints.root, recursive=False, allow_not_found=True)
    names = [posixpath.basename(info.path) for info in checkpoints.fs.get_file_info(selector)
             if info.type == pafs.FileType.Directory]
    return sorted(n for n in names if n.startswith("step-"))


def _latest_step_folder(checkpoints: Location) -> str | None:
    # A folder whose state.json is missing was cut off while it was written.
    complete = [n for n in _step_folders(checkpoints) if checkpoints.exists(n, STATE_FILE)]
    return complete[-1] if complete else None


def _store_step_folder(checkpoints: Location, model, optimizer, values: dict) -> None:
    name = f"step-{values['step']:08d}"
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(folder, model, optimizer, values)
        checkpoints.fs.create_dir(checkpoints.path(name), recursive=True)
        # state.json goes last, so a checkpoint cut off during the copy is never the latest.
        for file_name in sorted(os.listdir(folder), key=lambda f: f == STATE_FILE):
            pafs.copy_files(os.path.join(folder, file_name), checkpoints.path(name, file_name),
                            destination_filesystem=checkpoints.fs)
    for old in _step_folders(checkpoints)[:-KEEP_CHECKPOINTS]:
        checkpoints.fs.delete_dir(checkpoints.path(old))
    logger.info("checkpoint at step %d written to %s", values["step"], checkpoints.describe(name))


# As a Ray Train job.

def train_with_ray(payload: StudentPayload, data: TrainingData, settings: FinetuneSettings,
                   total: int, checkpoints: Location, fault: dict | None = None) -> Trained:
    """Run the loop on `settings.workers` Ray Train workers with gradients averaged over them.

    `fault` is a testing hook: {"rank": r, "step": s} makes worker r exit abruptly before step s
    (counted from 0) in a job that did not start from a checkpoint, as a lost node would.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue

    from rayq.driver import cluster

    cluster.connect(settings.address)
    gpus = settings.worker_gpus
    if gpus is None:
        gpus = 1.0 if any(n.get("GPU", 0) for n in cluster.node_resources()) else 0.0
    resources = {"CPU": 1.0, **({"GPU": gpus} if gpus else {})}
    steps_queue = Queue(actor_options={"num_cpus": 0})
    config = {"inputs": ray.put({"payload": payload, "data": data}), "settings": settings.model_dump(),
              "total": total, "queue": steps_queue, "fault": fault}
    trainer = TorchTrainer(
        _ray_train_worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=settings.workers, use_gpu=bool(gpus),
                                     resources_per_worker=resources),
        run_config=RunConfig(name=CHECKPOINTS, storage_path=posixpath.dirname(checkpoints.root),
                             storage_filesystem=None if checkpoints.is_local else checkpoints.fs,
                             failure_config=FailureConfig(max_failures=settings.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS)))
    logger.info("fine-tuning on %d Ray Train workers (%s each), checkpoints in %s",
                settings.workers, resources, checkpoints.uri)
    try:
        result = _fit_with_progress(trainer, steps_queue, Empty, total)
    finally:
        ray.kill(steps_queue.actor)
    if result.error is not None:
        raise RunFailedError(f"the Ray Train job failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RunFailedError("the Ray Train job finished without a checkpoint")
    model = payload.build()
    with result.checkpoint.as_directory() as folder:
        state = _load_state(folder, model, make_optimizer(model, settings))
    workers = [{"worker_id": f"ray-train-{rank}", "rank": rank, "device": "cuda" if gpus else "cpu"}
               for rank in range(settings.workers)]
    return Trained(model, state, workers)


def _fit_with_progress(trainer, steps_queue, empty: type[Exception], total: int):
    """Run `trainer.fit()` while logging the steps that rank 0 puts on the queue."""
    done = threading.Event()
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread below
            outcome["error"] = exc
        finally:
            done.set()

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    with progress.phase("fine-tuning", total, unit="steps") as advance:
        while not done.is_set() or not steps_queue.empty():
            try:
                step, loss = steps_queue.get(timeout=0.5)
            except empty:
                continue
            logger.info("fine-tuning step %d/%d: loss %.6g", step, total, loss)
            advance(1)
    thread.join()
    if "error" in outcome:
        raise RunFailedError(f"the Ray Train job failed: {outcome['error']}") from outcome["error"]
    return outcome["result"]


def _ray_train_worker(config: dict) -> None:
    """The training function of each Ray Train worker."""
    import ray
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    inputs = ray.get(config["inputs"])
    settings = FinetuneSettings(**config["settings"])
    model = inputs["payload"].build().to(ray.train.torch.get_device())
    optimizer = make_optimizer(model, settings)

    state = LoopState()
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            state = _load_state(folder, model, optimizer)
        state.resumed_from.append(state.step)
        logger.warning("worker %d resumes from the checkpoint at step %d", rank, state.step)

    def checkpoint(values: dict) -> None:
        metrics = {"step": values["step"], "loss": values["history"][-1]["loss"]}
        with tempfile.TemporaryDirectory() as folder:
            found = None
            if rank == 0:
                save_checkpoint(folder, model, optimizer, values)
                found = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=found)

    def before_step(step: int) -> None:
        fault = config["fault"]
        if fault and restored is None and rank == fault["rank"] and step == fault["step"]:
            logger.error("fault injection: Ray Train worker %d exits before step %d", rank, step)
            os._exit(1)

    hooks = LoopHooks(rank=rank, world=world, average_gradients=_average_gradients,
                      mean=lambda value: _mean_over_workers(value, ray.train.torch.get_device()),
                      on_step=lambda step, loss: config["queue"].put((step, loss)) if rank == 0 else None,
                      checkpoint=checkpoint, before_step=before_step, log_steps=False)
    run_loop(model, optimizer, inputs["data"], resolve_loss(settings.loss), settings,
             config["total"], state, hooks)


def _average_gradients(parameters: list[nn.Parameter]) -> None:
    """All-reduce every gradient in one flat tensor and divide by the worker count.

    A parameter without a gradient counts as a zero gradient, so every worker sends the same
    layout whether or not its batch reached that parameter.
    """
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for parameter in parameters:
        count = parameter.numel()
        parameter.grad = flat[offset:offset + count].view_as(parameter).clone()
        offset += count


def _mean_over_workers(value: float, device: torch.device) -> float:
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor) / dist.get_world_size()
