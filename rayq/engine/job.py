"""A validated `rayq compress` job run end to end: inputs loaded, scored on Ray, run written.

Shared by `rayq compress` and every model of `rayq zoo`.
"""

from __future__ import annotations

import logging

from rayq.config import JobConfig

logger = logging.getLogger(__name__)


def load_job_inputs(job: JobConfig, loaded=None):
    """Load the job's float model (unless `loaded` is given), calibration and evaluation batches.

    Returns (LoadedModel, calibration batches, evaluation batches or None).
    """
    from rayq.sources.data import load_batches
    from rayq.sources.models import load_source, parse_model_spec

    if loaded is None:
        loaded = load_source(parse_model_spec(job.model, job.model_weights), trust_code=True)
    batches = load_batches(job.calibration, loaded.tokenizer, job.batch_size, job.max_length,
                           job.max_batches)
    evaluation = None
    if job.evaluation:
        evaluation = load_batches(job.evaluation, loaded.tokenizer, job.batch_size, job.max_length)
    return loaded, batches, evaluation


def compress_job(job: JobConfig, loaded, batches, evaluation):
    """Score the job's model on Ray actors and return the CompressResult."""
    import rayq

    quantization = job.quantization()
    return rayq.compress(
        loaded.module, batches, evaluation=evaluation, workers=job.workers or 1,
        address=job.address, source=loaded.source, worker_cpus=job.worker_cpus,
        worker_gpus=job.worker_gpus, max_restarts=job.max_restarts,
        **quantization.model_dump(exclude={"threshold", "schemes", "pins"}),
        threshold=quantization.threshold, schemes=quantization.schemes,
        pins=[p.model_dump() for p in quantization.pins])
