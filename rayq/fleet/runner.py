"""Running a fleet: each model is skipped, compressed or failed on its own, several at once.

Each model runs in a thread of the driver. The thread loads the model and its data, starts the
model's Ray scoring actors, evaluates the plan and writes the run. So a running model takes its
workers' CPUs or GPUs on the cluster, and its float model and held-out outputs take driver memory.
A model's failure (a missing file, a forward that raises, a worker that dies more often than
`max_restarts`) is caught in its thread and recorded; the other models go on.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

from botocore.exceptions import BotoCoreError, ClientError

from rayq.config import JobConfig
from rayq.driver.placement import WorkerRequest, check_placement, default_request
from rayq.errors import RayqError, StorageError
from rayq.fleet.claims import ClaimStore
from rayq.fleet.fingerprint import changed_parts, job_fingerprint
from rayq.storage.location import Location, parse_location
from rayq.storage.run import MANIFEST, open_run, write_run

logger = logging.getLogger(__name__)

DONE, SKIPPED, FAILED = "done", "skipped", "failed"
# A failure's reason keeps this many characters in the table; the log has the whole error.
MAX_REASON_CHARS = 1000


@dataclass
class ModelOutcome:
    """One row of the fleet table."""

    name: str
    status: str
    reason: str
    location: str
    duration_s: float = 0.0
    float_bytes: int | None = None
    model_bytes: int | None = None
    compression_ratio: float | None = None
    relative_error: float | None = None
    cosine_mean: float | None = None
    threshold: float | None = None
    fingerprint: str | None = None
    extra: dict = field(default_factory=dict, repr=False)


@dataclass
class FleetRun:
    """Settings shared by the models of one fleet: its claims, `--force`, and the cluster's nodes."""

    claims: ClaimStore
    force: bool = False
    # Total resources of each alive node ("CPU", "GPU"), to check each model's workers fit.
    nodes: list[dict[str, float]] = field(default_factory=list)


def run_models(jobs: dict[str, JobConfig], fleet: FleetRun, parallel: int) -> list[ModelOutcome]:
    """Run every job with at most `parallel` at once; return the outcomes in the jobs' order."""
    logger.info("fleet of %d models, %d at once, claims as %s", len(jobs), parallel,
                fleet.claims.owner)
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="rayq-zoo") as pool:
        futures = {name: pool.submit(run_model, name, job, fleet) for name, job in jobs.items()}
        return [futures[name].result() for name in jobs]


def run_model(name: str, job: JobConfig, fleet: FleetRun) -> ModelOutcome:
    """Skip, compress or fail one model; any Exception becomes a failed outcome."""
    started = time.perf_counter()
    try:
        outcome = _skip_or_compress(name, job, fleet)
    except RayqError as exc:
        logger.error("model %s failed: %s", name, exc)
        outcome = ModelOutcome(name, FAILED, _clip(str(exc)), job.output)
    except Exception as exc:  # any failure of one model must leave the others running
        logger.exception("model %s failed", name)
        outcome = ModelOutcome(name, FAILED, _clip(describe_failure(exc)), job.output)
    outcome.duration_s = time.perf_counter() - started
    logger.info("model %s: %s (%s) in %.1f s", name, outcome.status, outcome.reason,
                outcome.duration_s)
    return outcome


def worker_request(job: JobConfig, nodes: list[dict[str, float]]) -> WorkerRequest:
    return default_request(job.workers or 1, sum(n.get("GPU", 0) for n in nodes), job.worker_cpus,
                           job.worker_gpus)


def describe_failure(exc: BaseException) -> str:
    """Return the exception's type and last message line, without the remote traceback that Ray
    puts in front of an error raised inside an actor."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else repr(exc)}"


def _clip(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS - 3] + "..."


def _skip_or_compress(name: str, job: JobConfig, fleet: FleetRun) -> ModelOutcome:
    from rayq.sources.data import check_spec
    from rayq.sources.models import load_source, parse_model_spec

    location = parse_location(job.output)
    source = parse_model_spec(job.model, job.model_weights)
    for spec in filter(None, (job.calibration, job.evaluation)):
        check_spec(spec)
    # A factory's weights are known only once it has run; folders are hashed without loading.
    loaded = load_source(source, trust_code=True) if source["kind"] == "python" else None
    fingerprint = job_fingerprint(job, source, loaded.module if loaded else None)

    state, manifest = previous_run(location)
    skipped = _skip_unchanged(name, location, manifest, fingerprint, fleet.force)
    if skipped is not None:
        return skipped
    holder = fleet.claims.acquire(name)
    if holder is not None:
        until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.expires_unix_s))
        return ModelOutcome(name, SKIPPED, f"claimed by fleet {holder.owner} until {until}",
                            location.uri, fingerprint=fingerprint["sha256"])
    try:
        with _renewing(fleet.claims, name):
            # Another fleet may have finished this model between the first look and the claim.
            state, manifest = previous_run(location)
            skipped = _skip_unchanged(name, location, manifest, fingerprint, fleet.force)
            if skipped is not None:
                return skipped
            reason = _why(state, manifest, fingerprint, fleet.force)
            if _unchanged(manifest, fingerprint, fleet.force):
                reason = "previous run with the same fingerprint is corrupted"
            check_placement(worker_request(job, fleet.nodes), fleet.nodes)
            logger.info("compressing %s: %s", name, reason)
            return _compress(name, job, location, loaded, fingerprint, reason)
    finally:
        fleet.claims.release(name)


def previous_run(location: Location) -> tuple[str, dict | None]:
    """Return ("none" | "incomplete" | "finished", the manifest of a finished run).

    A manifest that is not valid JSON counts as an incomplete run, so the model is redone.
    """
    if location.exists(MANIFEST):
        try:
            return "finished", json.loads(location.read_bytes(MANIFEST))
        except json.JSONDecodeError:
            return "incomplete", None
    return ("incomplete" if location.list_files() else "none"), None


def _unchanged(manifest: dict | None, fingerprint: dict, force: bool) -> bool:
    if force or manifest is None:
        return False
    return (manifest.get("fingerprint") or {}).get("sha256") == fingerprint["sha256"]


def _why(state: str, manifest: dict | None, fingerprint: dict, force: bool) -> str:
    if force and state == "finished":
        return "--force given"
    if state == "none":
        return "no previous run"
    if state == "incomplete":
        return "previous run is incomplete (no readable manifest)"
    if not manifest.get("fingerprint"):
        return "previous run records no fingerprint"
    return " and ".join(changed_parts(manifest["fingerprint"], fingerprint)) + " changed"


def _skip_unchanged(name: str, location: Location, manifest: dict | None, fingerprint: dict,
                    force: bool) -> ModelOutcome | None:
    """Return the skipped outcome of an unchanged finished run, or None to compress the model.

    A finished run that fails its checksums is compressed again rather than skipped.
    """
    if not _unchanged(manifest, fingerprint, force):
        return None
    try:
        return _skipped_from(name, location, manifest)
    except StorageError as exc:
        logger.warning("model %s: the finished run at %s is unreadable (%s); compressing again",
                       name, location.uri, exc)
        return None


def _skipped_from(name: str, location: Location, manifest: dict) -> ModelOutcome:
    created = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(manifest.get("created_unix_s", 0)))
    run = open_run(location)
    outcome = ModelOutcome(name, SKIPPED, f"unchanged since the run of {created}", location.uri,
                           fingerprint=manifest["fingerprint"]["sha256"])
    _fill_sizes(outcome, run.table("thresholds").to_pylist())
    return outcome


def _compress(name: str, job: JobConfig, location: Location, loaded, fingerprint: dict,
              reason: str) -> ModelOutcome:
    from rayq.engine.job import compress_job, load_job_inputs

    loaded, batches, evaluation = load_job_inputs(job, loaded)
    result = compress_job(job, loaded, batches, evaluation)
    write_run(result, location, config=job.model_dump(mode="json"), source=loaded.source,
              overwrite=True, extra={"fingerprint": fingerprint})
    outcome = ModelOutcome(name, DONE, reason, location.uri, fingerprint=fingerprint["sha256"])
    _fill_sizes(outcome, result.thresholds.to_pylist())
    return outcome


def _fill_sizes(outcome: ModelOutcome, thresholds: list[dict]) -> None:
    chosen = next(row for row in thresholds if row["chosen"])
    outcome.threshold = chosen["threshold"]
    outcome.model_bytes = chosen["model_bytes"]
    outcome.compression_ratio = chosen["compression_ratio"]
    if chosen["compression_ratio"]:
        outcome.float_bytes = round(chosen["model_bytes"] * chosen["compression_ratio"])
    outcome.relative_error = chosen["relative_error"]
    outcome.cosine_mean = chosen["cosine_mean"]


@contextmanager
def _renewing(claims: ClaimStore, name: str):
    """Renew the claim on `name` every third of its lifetime until the block ends."""
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(claims.ttl_s / 3):
            try:
                claims.renew(name)
            except (OSError, BotoCoreError, ClientError) as exc:  # the run goes on regardless
                logger.warning("could not renew the claim on %s: %s", name, exc)

    thread = threading.Thread(target=renew, name=f"rayq-claim-{name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
