"""The work behind each `rayq` subcommand. Only this package prints for people."""

from __future__ import annotations

import argparse
import logging
import os
import time

from rayq.cli.jobs import build_job, read_job_file
from rayq.config import JobConfig
from rayq.errors import ConfigError, DataError, StorageError

logger = logging.getLogger(__name__)


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _flag_values(args: argparse.Namespace) -> dict:
    values = {name: getattr(args, name) for name in (
        "model", "model_weights", "calibration", "evaluation", "output", "threshold",
        "activation_method", "sensitivity_mode", "qs_normalization", "batch_size", "max_batches",
        "max_length", "workers", "address",
        "worker_cpus", "worker_gpus", "max_restarts", "weight_cap_bytes", "overwrite")}
    if args.schemes is not None:
        values["schemes"] = [s.strip() for s in args.schemes.split(",") if s.strip()]
    if args.pin:
        values["pins"] = [_parse_pin(text) for text in args.pin]
    return values


def _parse_pin(text: str) -> dict:
    pattern, sep, scheme = text.rpartition("=")
    if not sep or not pattern:
        raise ConfigError(f"invalid --pin {text!r}: expected PATTERN=SCHEME, such as "
                          "'classifier.*=float'")
    return {"pattern": pattern, "scheme": scheme}


def compress(args: argparse.Namespace) -> int:
    file_values = read_job_file(args.job) if args.job else {}
    job = build_job(file_values, _flag_values(args), args.job)
    return run_job(job, dry_run=args.dry_run)


def run_job(job: JobConfig, dry_run: bool = False) -> int:
    """Validate cheap things first (output, cluster), then load, score, plan and write."""
    from rayq.driver import cluster
    from rayq.driver.placement import check_placement, default_request
    from rayq.storage.location import parse_location
    from rayq.storage.run import check_writable

    from rayq.sources.models import parse_model_spec

    started = time.perf_counter()
    from rayq.sources.data import check_spec

    # Missing models and data fail here, before Ray takes seconds to start.
    parse_model_spec(job.model, job.model_weights)
    for spec in filter(None, (job.calibration, job.evaluation)):
        check_spec(spec)
    output = parse_location(job.output)
    check_writable(output, job.overwrite)

    cluster.connect(job.address)
    nodes = cluster.node_resources()
    request = default_request(job.workers or 1, sum(n.get("GPU", 0) for n in nodes),
                              job.worker_cpus, job.worker_gpus)
    check_placement(request, nodes)

    folder = _block_folder(job)
    if folder is not None:
        if dry_run:
            return _dry_run_blocks(job, folder)
        return _run_blocks(job, folder, output, started)

    from rayq.engine.job import load_job_inputs

    loaded, batches, evaluation = load_job_inputs(job)
    if dry_run:
        return _dry_run(job, loaded, batches, request)

    from rayq.engine.job import compress_job
    from rayq.fleet.fingerprint import job_fingerprint

    fingerprint = job_fingerprint(job, loaded.source, loaded.module)
    result = compress_job(job, loaded, batches, evaluation)
    _write_and_print(result, job, output, loaded.source, started,
                     extra={"fingerprint": fingerprint})
    return 0


def _block_folder(job: JobConfig) -> str | None:
    """Return the model folder when the model is a causal LM whose weights exceed the cap.

    Without --weight-cap-bytes, the cap is the default of this machine (see
    rayq.driver.memory), although the workers' machines may have more or less memory.
    """
    from rayq.driver.memory import default_weight_cap_bytes
    from rayq.sources.decoder import is_decoder_folder
    from rayq.sources.models import model_folder, parse_model_spec
    from rayq.storage.tensors import checkpoint_index

    folder = model_folder(parse_model_spec(job.model, job.model_weights))
    if folder is None or not is_decoder_folder(folder):
        return None
    cap = job.weight_cap_bytes or default_weight_cap_bytes()
    weights = sum(entry.nbytes for entry in checkpoint_index(folder).values())
    if weights <= cap:
        return None
    logger.info("%.2f GB of weights exceed the weight cap of %.2f GB per worker; scoring block "
                "by block", weights / 1e9, cap / 1e9)
    return folder


def _dry_run_blocks(job: JobConfig, folder: str) -> int:
    """Print the blocks a block-by-block run would score, without loading any weight."""
    from rayq.driver.memory import default_weight_cap_bytes
    from rayq.engine.blocks import check_block_settings
    from rayq.sources.decoder import DecoderModel

    quantization = job.quantization()
    check_block_settings(quantization)
    cap = job.weight_cap_bytes or default_weight_cap_bytes()
    decoder = DecoderModel(folder)
    blocks = decoder.plan_blocks(cap, quantization.schemes)
    print(f"job is valid: {decoder.weight_bytes / 1e9:.2f} GB of weights, scored block by block "
          f"under a weight cap of {cap / 1e9:.2f} GB per worker")
    for block in blocks:
        print(f"  {block.describe()}, about {block.resident_bytes / 1e9:.2f} GB resident")
    print("dry run: stopped before scoring; nothing was written")
    return 0


def _run_blocks(job: JobConfig, folder: str, output, started: float) -> int:
    import rayq
    from rayq.sources.data import load_batches
    from rayq.sources.models import load_tokenizer, parse_model_spec

    source = parse_model_spec(job.model, job.model_weights)
    batches = load_batches(job.calibration, load_tokenizer(folder), job.batch_size,
                           job.max_length, job.max_batches)
    quantization = job.quantization()
    result = rayq.compress_blocks(
        folder, batches, workers=job.workers or 1, address=job.address,
        weight_cap_bytes=job.weight_cap_bytes, worker_cpus=job.worker_cpus,
        worker_gpus=job.worker_gpus, max_restarts=job.max_restarts,
        **quantization.model_dump(exclude={"threshold", "schemes", "pins"}),
        threshold=quantization.threshold, schemes=quantization.schemes,
        pins=[p.model_dump() for p in quantization.pins])
    _write_and_print(result, job, output, source, started)
    return 0


def _dry_run(job, loaded, batches, request) -> int:
    import torch

    from rayq.engine.compress import prepare
    from rayq.scoring.batches import call_model, describe_batch

    prepared = prepare(loaded.module)
    with torch.no_grad():
        call_model(prepared.model, batches[0], 0)
    print(f"job is valid: {len(batches)} calibration batches, first batch "
          f"{describe_batch(batches[0])} runs through the model")
    print(f"quantizable layers ({len(prepared.layers)}):")
    for layer in prepared.layers:
        unfit = "; ".join(f"{k}: {v}" for k, v in layer.unfit.items())
        print(f"  {layer.name}  {layer.module_type}  {layer.parameter_count} parameters"
              + (f"  ({unfit})" if unfit else ""))
    print(f"kept float without a rule: {len(prepared.kept)} modules")
    print(f"workers: {request.describe()}")
    print("dry run: stopped before scoring; nothing was written")
    return 0


def _write_and_print(result, job: JobConfig, output, source: dict, started: float,
                     extra: dict | None = None) -> None:
    from rayq.engine.summary import summary_text
    from rayq.storage.run import write_run

    config = job.model_dump(mode="json")
    write_run(result, output, config=config, source=source, overwrite=job.overwrite, extra=extra)
    print(summary_text(result.thresholds, result.plan))
    chosen = [r for r in result.thresholds.to_pylist() if r["chosen"]][0]
    ratio = f"compression ratio {chosen['compression_ratio']:.2f}x ({_size(chosen['model_bytes'])})"
    if chosen["cosine_mean"] is None:
        print(f"check: no held-out error measured (scored block by block), {ratio}")
    else:
        kind = "in-sample" if result.in_sample else "held-out"
        print(f"check: {kind} cosine similarity to the float model {chosen['cosine_mean']:.5f} "
              f"(min {chosen['cosine_min']:.5f}), {ratio}")
    print(f"wrote {output.uri} in {time.perf_counter() - started:.0f} s")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _size(count: int) -> str:
    if count >= 1e6:
        return f"{count / 1e6:.1f} MB"
    return f"{count / 1e3:.1f} kB" if count >= 1e3 else f"{count} bytes"


def zoo(args: argparse.Namespace) -> int:
    """Compress every model of a fleet file; exit 1 if any model failed."""
    from rayq.config import load_fleet
    from rayq.driver import cluster
    from rayq.storage.location import parse_location
    from rayq.storage.run import check_writable

    if args.parallel is not None and args.parallel < 1:
        raise ConfigError(f"invalid --parallel {args.parallel}: expected at least 1")
    data = read_job_file(args.fleet)
    if args.output:
        data["output"] = args.output
    fleet = load_fleet(data, args.fleet)
    jobs = fleet.jobs(args.fleet)
    root = parse_location(fleet.output)
    check_writable(root, overwrite=True)  # reachable, and the bucket exists

    address = args.address or next(iter(jobs.values())).address
    started = cluster.connect(address)
    local = not (address or os.environ.get("RAY_ADDRESS"))
    try:
        return _run_fleet(args, fleet, jobs, root)
    finally:
        removed = cluster.shutdown(delete_spilled=started and local) if started else []
        if removed:
            logger.info("removed Ray's spilled objects: %s", ", ".join(removed))


def _run_fleet(args: argparse.Namespace, fleet, jobs: dict, root) -> int:
    from rayq.driver import cluster
    from rayq.fleet.claims import ClaimStore, new_owner_id, remove_expired_claims
    from rayq.fleet.runner import FAILED, FleetRun, run_models, worker_request
    from rayq.fleet.schedule import models_at_once
    from rayq.fleet.table import FLEET_FILE, fleet_table, fleet_text, write_fleet_table

    nodes = cluster.node_resources()
    parallel = args.parallel or fleet.parallel or models_at_once(
        [worker_request(job, nodes) for job in jobs.values()], nodes)

    owner = new_owner_id()
    claims = ClaimStore(root, owner, fleet.claim_ttl_s)
    outcomes = run_models(jobs, FleetRun(claims, force=args.force, nodes=nodes), parallel)
    table = fleet_table(outcomes, owner, time.time())
    write_fleet_table(root, table)
    removed = remove_expired_claims(root)
    if removed:
        logger.info("removed %d expired claim files: %s", len(removed), ", ".join(removed))

    print(fleet_text(table))
    failed = sum(outcome.status == FAILED for outcome in outcomes)
    print(f"wrote {root.describe(FLEET_FILE)}: {len(outcomes) - failed} of {len(outcomes)} "
          f"models done or skipped, {failed} failed")
    return 1 if failed else 0


def report(args: argparse.Namespace) -> int:
    from rayq.storage.run import open_run

    if args.pictures:
        _require_matplotlib()
    run = open_run(args.location)
    run.verify()
    print(run.read("summary.txt").decode(), end="")
    if run.manifest.get("finetune"):
        origin = f"fine-tuned from {run.manifest['parent']}"
    elif run.manifest.get("parent"):
        origin = f"re-planned from {run.manifest['parent']}"
    else:
        origin = _count(len(run.manifest["workers"]), "worker")
    print(f"run: {run.location.uri} (rayq {run.manifest['versions'].get('rayq', '?')}, {origin})")
    if args.html:
        _write_page(run, args.html)
    if args.pictures:
        _write_pictures(run, args.pictures)
    return 0


def _write_local_file(path: str, data: bytes) -> None:
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc}. Choose a local path you can write "
                           "to.") from None


def _write_page(run, path: str) -> None:
    """Write the page from the stored tables, so runs written before pages existed get one too."""
    from rayq.report import report_html, run_title

    page = report_html(run.table("sensitivity"), run.table("plan"), run.table("thresholds"),
                       title=run_title(run.manifest.get("source")))
    _write_local_file(path, page.encode())
    print(f"wrote {path}")


def _require_matplotlib() -> None:
    from rayq.report import INSTALL_MATPLOTLIB

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("--pictures needs matplotlib, which is not installed; "
                          f"{INSTALL_MATPLOTLIB}") from None


def _write_pictures(run, folder: str) -> None:
    from rayq.report import png_files

    pictures = png_files(run.table("sensitivity"), run.table("plan"), run.table("thresholds"))
    for name, data in pictures.items():
        path = os.path.join(folder, name)
        _write_local_file(path, data)
        print(f"wrote {path}")


def plan(args: argparse.Namespace) -> int:
    """Re-plan a finished run from its stored scores, with no scoring pass and no Ray.

    Only the held-out batches run through the model, to measure the new plan's error. The plan,
    the threshold table and the model equal those of a fresh `rayq compress` at that threshold.
    """
    from pydantic import ValidationError

    from rayq.engine.compress import check_scored_schemes, finish, prepare, split_batches
    from rayq.engine.evaluate import FloatOutputs
    from rayq.engine.stored import scores_from_table
    from rayq.planning.plan import check_threshold
    from rayq.sources.models import load_source
    from rayq.storage.location import parse_location
    from rayq.storage.run import check_writable, open_run

    started = time.perf_counter()
    threshold = check_threshold(args.threshold)
    run = open_run(args.location)
    run.verify()  # a corrupted parent must not seed a new run
    target = parse_location(args.output or args.location)
    check_writable(target, args.overwrite)
    try:
        job = JobConfig(**run.manifest["config"])
    except ValidationError:
        raise DataError(f"{run.location.uri} records no `rayq compress` job (model and "
                        "calibration data), as runs written by rayq.save do, so it cannot be "
                        "re-planned from the command line; use CompressResult.replan in "
                        "Python") from None
    schemes = job.schemes
    if args.schemes is not None:
        schemes = check_scored_schemes(
            [s.strip() for s in args.schemes.split(",") if s.strip()], job.schemes)
    source = run.manifest.get("source") or {}
    if not source:
        raise DataError(f"{run.location.uri} does not record its model source, so it cannot be "
                        "re-planned from the command line; use CompressResult.replan in Python")
    loaded = load_source(source, trust_code=args.trust_code)
    prepared = prepare(loaded.module)
    scores = scores_from_table(run.table("sensitivity"), prepared, job.sensitivity_mode)

    from rayq.sources.data import load_batches

    batches = load_batches(job.calibration, loaded.tokenizer, job.batch_size, job.max_length,
                           job.max_batches)
    evaluation = (load_batches(job.evaluation, loaded.tokenizer, job.batch_size, job.max_length)
                  if job.evaluation else None)
    _, held_out, in_sample = split_batches(batches, evaluation, job.evaluation_batches)
    settings = job.quantization().model_copy(update={"threshold": threshold, "schemes": schemes})
    # Plans already measured in the stored guidance table keep their errors; only new ones run.
    # A table planned with other candidates holds other plans, so it is measured anew.
    known = run.table("thresholds") if set(schemes) == set(job.schemes) else None
    logger.info("re-planning at threshold %g from stored scores; plans not in the stored table "
                "are measured on %d held-out batches", threshold, len(held_out))
    result = finish(prepared.model, scores, settings, prepared.folded, held_out,
                    FloatOutputs(prepared.model, held_out), in_sample, evaluate=True,
                    known_thresholds=known)
    job = job.model_copy(update={"threshold": threshold, "schemes": schemes, "output": target.uri,
                                 "overwrite": args.overwrite})
    _write_and_print(result, job, target, source, started,
                     extra={"parent": run.location.uri, "parent_threshold": run.manifest["config"].get("threshold")})
    return 0


FINETUNE_FLAGS = ("steps", "epochs", "learning_rate", "batch_size", "workers", "worker_gpus",
                  "address", "checkpoint_every", "max_failures", "learn_scales", "loss", "data",
                  "label_column")


def finetune(args: argparse.Namespace) -> int:
    """Fine-tune a finished run into a new run and print the fidelity before and after."""
    import rayq
    from rayq.config import finetune_settings
    from rayq.finetune.job import finetune_text

    settings = {name: getattr(args, name) for name in FINETUNE_FLAGS if getattr(args, name) is not None}
    # Checked here first, so that an error names the options rather than the Python arguments.
    finetune_settings("command-line options", frozenset(settings), **settings)
    result = rayq.finetune(args.location, args.output, trust_code=args.trust_code,
                           overwrite=args.overwrite, **settings)
    print(finetune_text(result).strip())
    print(f"wrote {result.location.uri} in {result.seconds:.0f} s")
    return 0
