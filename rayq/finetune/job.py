"""`rayq.finetune`: fine-tune the compressed model of a finished run and write it as a new run.

The parent run is only read. Its manifest gives the model source and the calibration job, so the
teacher (the float model), the training batches and the held-out batches are the ones that
compressed it. The new run has the parent's layout. It contains the fine-tuned model, the
parent's sensitivity and plan tables, and its threshold table with the chosen row measured again
on the fine-tuned model. `finetune.parquet` adds the loss of every step, and the manifest records
the parent.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import ValidationError
from torch import nn

from rayq.config import FinetuneSettings, JobConfig, finetune_settings
from rayq.engine.evaluate import Fidelity, measure, reference_outputs
from rayq.errors import ConfigError, DataError
from rayq.finetune.loop import TrainingData, total_steps
from rayq.finetune.objective import resolve_loss
from rayq.finetune.runners import (
    CHECKPOINTS,
    StudentPayload,
    Trained,
    train_in_process,
    train_with_ray,
)
from rayq.model.compressed import freeze
from rayq.scoring.batches import Batch, call_model, float_tensors
from rayq.storage import model_io
from rayq.storage.location import Location, parse_location
from rayq.storage.run import StoredRun, check_writable, open_run, write_run

logger = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    """The outcome of `rayq.finetune`."""

    model: nn.Module             # the fine-tuned compressed model, frozen to integer codes
    trained_model: nn.Module = dataclasses.field(repr=False)  # the module at the end of training
    before: Fidelity = None
    after: Fidelity = None
    in_sample: bool = False
    steps: int = 0
    history: list[dict] = dataclasses.field(default_factory=list, repr=False)
    resumed_from: list[int] = dataclasses.field(default_factory=list)
    location: Location | None = None
    seconds: float = 0.0

    def recovered(self) -> float:
        """Return the share of the lost cosine similarity that fine-tuning won back (1.0: all)."""
        lost = 1.0 - self.before.cosine_mean
        return (self.after.cosine_mean - self.before.cosine_mean) / lost if lost > 0 else 0.0


@dataclass
class _Parent:
    run: StoredRun
    job: JobConfig
    source: dict | None
    quant_config: dict
    weights: bytes


def finetune(location: str, output: str, *, model: nn.Module | None = None,
             trust_code: bool = False, overwrite: bool = False, fault: dict | None = None,
             **settings: Any) -> FinetuneResult:
    """Fine-tune a finished run's compressed model with quantization in the loop; write a new run.

    `settings` are the fields of `rayq.config.FinetuneSettings` (steps or epochs, learning_rate,
    batch_size, workers, checkpoint_every, learn_scales, loss, data, label_column). Give `model`,
    a float instance of the architecture, for a run whose model was handed over in memory; a run
    whose source is a Python factory is imported only with `trust_code`. `fault` is a testing
    hook of the runners.
    """
    started = time.perf_counter()
    options = finetune_settings(**settings)
    parent = _open_parent(location, model, trust_code)
    target = parse_location(output)
    if target.uri.rstrip("/") == parent.run.location.uri.rstrip("/") or target.root == parent.run.location.root:
        raise ConfigError(f"the output {output!r} is the parent run itself; fine-tuning never "
                          "modifies its parent, so choose a new output location")
    check_writable(target, overwrite)
    loss_function = resolve_loss(options.loss)  # an unknown user loss fails before any work

    float_model, tokenizer = _float_model(parent, model)
    training, held_out, in_sample = _batches(parent.job, options, tokenizer)
    teacher = _teacher(float_model)
    data = _training_data(teacher, training, options)
    references = reference_outputs(teacher, held_out)
    student = model_io.load_model_files(parent.weights, parent.quant_config, float_model)
    _check_loss(loss_function, student, data)
    before = measure(student, held_out, references)
    logger.info("before fine-tuning: held-out cosine %.5f, relative error %.5f",
                before.cosine_mean, before.relative_error)

    payload = StudentPayload(parent.source if model is None else None,
                             float_model if model is not None or parent.source is None else None,
                             parent.weights, parent.quant_config, options.learn_scales)
    trained = _train(payload, data, options, target, fault)
    frozen = freeze(copy.deepcopy(trained.model))
    after = measure(frozen, held_out, references)
    logger.info("after fine-tuning: held-out cosine %.5f, relative error %.5f",
                after.cosine_mean, after.relative_error)
    if after.cosine_mean < before.cosine_mean:
        logger.warning("fine-tuning lowered the held-out cosine from %.5f to %.5f; the run is "
                       "written, but the parent is closer to the float model",
                       before.cosine_mean, after.cosine_mean)

    result = FinetuneResult(frozen, trained.model, before, after, in_sample, trained.state.step,
                            trained.state.history, trained.state.resumed_from, target)
    _write(parent, result, options, trained, target, overwrite)
    result.seconds = time.perf_counter() - started
    return result


def _open_parent(location: str, model: nn.Module | None, trust_code: bool) -> _Parent:
    run = open_run(location)
    run.verify()  # a corrupted parent must not seed a new run
    try:
        job = JobConfig(**run.manifest["config"])
    except ValidationError:
        raise DataError(f"{run.location.uri} records no `rayq compress` job (model and "
                        "calibration data), as runs written by rayq.save do, so rayq cannot find "
                        "its training data; compress it with `rayq compress` first") from None
    source = run.manifest.get("source")
    if model is None and not source:
        raise DataError(f"{run.location.uri} contains a model that was handed over in memory; "
                        "call rayq.finetune(location, output, model=FLOAT_MODEL)")
    if model is None and source.get("kind") == "python" and not trust_code:
        raise ConfigError(f"this run's model comes from the Python factory {source['factory']!r}; "
                          "importing it runs code, so pass --trust-code (trust_code=True) if you "
                          "trust it")
    quant_config = json.loads(run.read(f"model/{model_io.CONFIG_FILE}"))
    return _Parent(run, job, source, quant_config, run.read(f"model/{model_io.WEIGHTS_FILE}"))


def _float_model(parent: _Parent, model: nn.Module | None) -> tuple[nn.Module, Any]:
    from rayq.sources.models import load_source

    if model is not None:
        return model, None
    loaded = load_source(parent.source, trust_code=True)
    return loaded.module, loaded.tokenizer


def _batches(job: JobConfig, options: FinetuneSettings, tokenizer) -> tuple[list, list, bool]:
    """Return (training batches, held-out batches, whether the held-out batches are in-sample)."""
    from rayq.engine.compress import split_batches
    from rayq.sources.data import load_batches

    batches = load_batches(job.calibration, tokenizer, job.batch_size, job.max_length,
                           job.max_batches)
    evaluation = (load_batches(job.evaluation, tokenizer, job.batch_size, job.max_length)
                  if job.evaluation else None)
    training, held_out, in_sample = split_batches(batches, evaluation, job.evaluation_batches)
    if options.data is not None:
        from rayq.sources.data import parquet_batches

        training = parquet_batches(options.data, options.batch_size or job.batch_size)
    elif options.batch_size is not None:
        if options.batch_size > job.batch_size:
            raise ConfigError(f"invalid batch_size {options.batch_size}: fine-tuning cuts the "
                              f"run's calibration batches of {job.batch_size} samples, so give "
                              f"at most {job.batch_size}")
        training = [piece for batch in training for piece in split_batch(batch, options.batch_size)]
    return training, held_out, in_sample


def split_batch(batch: Batch, size: int) -> list[Batch]:
    """Cut a batch into pieces of at most `size` samples along the first dimension."""
    from rayq.scoring.batches import batch_size

    count = batch_size(batch)
    return [_slice(batch, start, start + size) for start in range(0, count, size)]


def _slice(value: Any, start: int, stop: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return value[start:stop]
    if isinstance(value, dict):
        return {k: _slice(v, start, stop) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_slice(v, start, stop) for v in value)
    return value


def _teacher(float_model: nn.Module) -> nn.Module:
    from rayq.engine.compress import prepare

    return prepare(float_model).model


def _training_data(teacher: nn.Module, batches: list[Batch], options: FinetuneSettings) -> TrainingData:
    if options.label_column is None:
        with torch.no_grad():
            targets = [[t.detach().float().cpu() for t in float_tensors(call_model(teacher, b, i))]
                       for i, b in enumerate(batches)]
        return TrainingData(batches, targets)
    inputs, labels = [], []
    for batch in batches:
        if not isinstance(batch, dict) or options.label_column not in batch:
            raise DataError(f"label column {options.label_column!r} not found in {options.data!r}; "
                            f"its columns are {sorted(batch) if isinstance(batch, dict) else []}")
        inputs.append({k: v for k, v in batch.items() if k != options.label_column})
        labels.append(batch[options.label_column])
    return TrainingData(inputs, labels)


def _check_loss(loss_function, student: nn.Module, data: TrainingData) -> None:
    """Run the loss once on the first batch, so a loss that does not fit fails before training."""
    with torch.no_grad():
        outputs = call_model(student, data.batches[0], 0)
        try:
            value = loss_function(outputs, data.targets[0])
        except (TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise ConfigError(f"the loss cannot compare the model's outputs with the targets: "
                              f"{exc}") from None
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ConfigError(f"the loss must return a scalar tensor, not {type(value).__name__} "
                          f"{getattr(value, 'shape', '')}")


def _train(payload: StudentPayload, data: TrainingData, options: FinetuneSettings,
           target: Location, fault: dict | None) -> Trained:
    world = options.workers or 1
    total = total_steps(options, len(data.batches), world)
    checkpoints = target.child(CHECKPOINTS)
    logger.info("fine-tuning: %d steps of %d batches on %s, learning rate %g%s", total,
                len(data.batches), f"{world} Ray Train workers" if options.workers else
                "this process", options.learning_rate,
                ", learned scales" if options.learn_scales else "")
    if options.workers:
        _check_cluster(options)
        return train_with_ray(payload, data, options, total, checkpoints, fault)
    return train_in_process(payload, data, options, total, checkpoints, fault)


def _check_cluster(options: FinetuneSettings) -> None:
    """Reject more workers than the cluster can place, since Ray Train would wait for them."""
    from rayq.driver import cluster

    cluster.connect(options.address)
    nodes = cluster.node_resources()
    cpus = sum(n.get("CPU", 0) for n in nodes)
    gpus = sum(n.get("GPU", 0) for n in nodes)
    if options.workers > cpus:
        raise ConfigError(f"invalid workers {options.workers}: each Ray Train worker needs one "
                          f"CPU and the cluster has {cpus:g}; give at most {int(cpus)}")
    if options.worker_gpus and options.workers * options.worker_gpus > gpus:
        raise ConfigError(f"invalid worker_gpus {options.worker_gpus}: {options.workers} workers "
                          f"need {options.workers * options.worker_gpus:g} GPUs and the cluster "
                          f"has {gpus:g}")


def _write(parent: _Parent, result: FinetuneResult, options: FinetuneSettings, trained: Trained,
           target: Location, overwrite: bool) -> None:
    from rayq.engine.summary import summary_text

    thresholds = _thresholds_after(parent.run.table("thresholds"), result.after)
    plan = parent.run.table("plan")
    contents = _RunContents(result.model, [tuple(p) for p in parent.quant_config["folded"]],
                            parent.run.table("sensitivity"), plan, thresholds, trained.workers)
    summary = summary_text(thresholds, plan) + finetune_text(result) + "\n"
    extra_files = {"finetune.parquet": _parquet_bytes(_history_table(result.history)),
                   "summary.txt": summary.encode()}
    config = parent.job.model_copy(update={"output": target.uri, "overwrite": overwrite})
    extra = {"parent": parent.run.location.uri, "parent_threshold": parent.job.threshold,
             "finetune": {**options.model_dump(mode="json"), "steps_run": result.steps,
                          "resumed_from": result.resumed_from,
                          "fidelity_before": dataclasses.asdict(result.before),
                          "fidelity_after": dataclasses.asdict(result.after)}}
    write_run(contents, target, config=config.model_dump(mode="json"), source=parent.source,
              overwrite=overwrite, extra=extra, extra_files=extra_files)
    _remove_checkpoints(target)


@dataclass
class _RunContents:
    """The parts of a result that `write_run` reads: the model, its folded pairs and the tables."""

    model: nn.Module
    folded: list[tuple[str, str]]
    sensitivity: pa.Table
    plan: pa.Table
    thresholds: pa.Table
    workers: list[dict]


def _thresholds_after(table: pa.Table, after: Fidelity) -> pa.Table:
    """Give the chosen row the fine-tuned model's errors and leave the other rows' errors empty.

    The fine-tuned weights exist only for the chosen plan. The parent's errors for the other
    thresholds describe models without that training, so the table does not show them.
    """
    rows = table.to_pylist()
    for row in rows:
        if row["chosen"]:
            row.update(relative_error=after.relative_error, cosine_mean=after.cosine_mean,
                       cosine_min=after.cosine_min)
        else:
            row.update(relative_error=None, cosine_mean=None, cosine_min=None)
    return pa.Table.from_pylist(rows, schema=table.schema)


def _history_table(history: list[dict]) -> pa.Table:
    return pa.table({"step": pa.array([h["step"] for h in history], pa.int64()),
                     "loss": pa.array([h["loss"] for h in history], pa.float64())})


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _remove_checkpoints(target: Location) -> None:
    checkpoints = target.child(CHECKPOINTS)
    try:
        if checkpoints.exists():
            checkpoints.fs.delete_dir(checkpoints.root)
    except OSError as exc:
        logger.warning("the run is written, but its checkpoints in %s could not be removed: %s",
                       checkpoints.uri, exc)


def finetune_text(result: FinetuneResult) -> str:
    """Return the fine-tuning lines of the summary: steps, fidelity before and after."""
    kind = "in-sample" if result.in_sample else "held-out"
    resumed = (f", resumed from step {', '.join(map(str, result.resumed_from))}"
               if result.resumed_from else "")
    last = result.history[-1]["loss"] if result.history else float("nan")
    if result.after.cosine_mean >= result.before.cosine_mean:
        verdict = f"{result.recovered():.0%} of the lost cosine recovered"
    else:
        # Training can lose fidelity, for example on a plan that had little to recover.
        verdict = ("WARNING: the fine-tuned model is further from the float model than its parent; "
                   "try fewer steps or a lower learning rate")
    return (f"\nfine-tuning: {result.steps} steps{resumed}, final loss {last:.6g}\n"
            f"{kind} cosine similarity to the float model: {result.before.cosine_mean:.5f} before, "
            f"{result.after.cosine_mean:.5f} after (min {result.before.cosine_min:.5f} -> "
            f"{result.after.cosine_min:.5f}); relative error {result.before.relative_error:.5f} -> "
            f"{result.after.relative_error:.5f}; {verdict}")


__all__ = ["FinetuneResult", "finetune", "split_batch"]
