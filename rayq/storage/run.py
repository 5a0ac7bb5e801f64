"""A run on storage: model, tables, pictures, summary and manifest, written safely, manifest last.

A local run is written into a hidden staging folder beside the target and renamed into place, so
a location never contains files of two runs and an interrupted write leaves nothing behind. On S3,
files are uploaded first and `manifest.json` last (see `rayq.storage.s3_write`); a location
without a manifest is an incomplete run, and readers report it as one.

Errors and CLI exit codes:
- StorageError, exit code 2 (invalid input): a malformed location, a missing bucket, an output
  location that cannot be reached before any work starts, a finished run in the way, a request
  the store rejects (access denied, missing credentials), a local path that cannot be written
  (permission denied, a file in the way), or a missing, incomplete or corrupted run to read.
- StorageWriteFailed, a StorageError with exit code 1 (a failed run): an S3 write that failed on
  a transient error (a lost connection, a timeout, a 5xx status) after every retry, or a local
  write that failed on a full disk or quota or an I/O error. The same command may succeed later.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from importlib import metadata

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from torch import nn

from rayq.engine.summary import summary_text
from rayq.errors import StorageError
from rayq.report import picture_files, run_title
from rayq.storage import model_io, s3_write
from rayq.storage.files import LocalFile, sha256_of
from rayq.storage.location import Location, parse_location
from rayq.storage.retry import StorageWriteFailed

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
RUN_FORMAT_VERSION = 1
TABLES = ("sensitivity", "plan", "thresholds")
# Local write errors that may clear up by themselves or once space is freed: a full disk, a full
# quota, a failing device. Others (permission denied, a path through a file) need a new location.
_RECOVERABLE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})
_PACKAGES = ("rayq", "torch", "ray", "pyarrow", "safetensors", "pydantic", "transformers")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def run_files(result, source: dict | None) -> dict[str, bytes]:
    """Return every file of a run except the manifest, as bytes keyed by relative path.

    The pictures come from the tables alone; without matplotlib the PNGs are left out (with a
    WARNING) and the tables and `report.html` are still written.
    """
    if getattr(result, "model_folder", None):
        files = _streamed_model_files(result.model_folder, source)
    else:
        files = {}
        with tempfile.TemporaryDirectory() as folder:
            model_io.save_model(result.model, folder, result.folded, source)
            for name in (model_io.WEIGHTS_FILE, model_io.CONFIG_FILE):
                with open(os.path.join(folder, name), "rb") as handle:
                    files[f"model/{name}"] = handle.read()
    for name in TABLES:
        files[f"{name}.parquet"] = _parquet_bytes(getattr(result, name))
    files["summary.txt"] = summary_text(result.thresholds, result.plan).encode()
    files.update(picture_files(result.sensitivity, result.plan, result.thresholds,
                               run_title(source)))
    return files


def _streamed_model_files(folder: str, source: dict | None) -> dict[str, bytes | LocalFile]:
    """Collect the model files a block-by-block build wrote to disk, recording the source."""
    with open(os.path.join(folder, model_io.CONFIG_FILE)) as handle:
        config = json.load(handle)
    config["source"] = source
    files: dict[str, bytes | LocalFile] = {
        f"model/{model_io.CONFIG_FILE}": json.dumps(config, indent=2).encode()}
    for name in config["weight_files"]:
        files[f"model/{name}"] = LocalFile(os.path.join(folder, name))
    return files


def manifest_for(files: dict[str, bytes | LocalFile], config: dict, workers: list[dict],
                 extra: dict | None = None) -> dict:
    return {
        "format_version": RUN_FORMAT_VERSION,
        "created_unix_s": time.time(),
        "config": config,
        "versions": package_versions(),
        "workers": workers,
        "files": {path: {"size_bytes": len(data), "sha256": sha256_of(data)}
                  for path, data in sorted(files.items())},
        **(extra or {}),
    }


def write_run(result, location: str | Location, config: dict, source: dict | None = None,
              overwrite: bool = False, extra: dict | None = None,
              extra_files: dict[str, bytes] | None = None) -> Location:
    """Write a run's files and then its manifest; refuse to replace a finished run by default.

    `extra_files` are added to the run's files by relative path, replacing any of the same name.
    """
    loc = parse_location(location) if isinstance(location, str) else location
    check_writable(loc, overwrite)
    files = {**run_files(result, source), **(extra_files or {})}
    manifest = manifest_for(files, config, result.workers, {"source": source, **(extra or {})})
    files_with_manifest = {**files, MANIFEST: json.dumps(manifest, indent=2).encode()}
    started = time.perf_counter()
    logger.info("writing run to %s (%d files, %.1f MB)", loc.uri, len(files_with_manifest),
                sum(len(data) for data in files_with_manifest.values()) / 1e6)
    if loc.is_local:
        _write_local(loc, files_with_manifest)
    else:
        s3_write.write_files(loc, files_with_manifest, MANIFEST)
    logger.info("wrote run to %s (%d files) in %.1f s", loc.uri, len(files_with_manifest),
                time.perf_counter() - started)
    return loc


def check_writable(loc: Location, overwrite: bool) -> None:
    """Raise before any work starts if the output location is unreachable or has a finished run."""
    try:
        if not loc.is_local:
            _check_bucket_exists(loc)
        finished = loc.exists(MANIFEST)
    except OSError as exc:
        raise StorageError(f"cannot reach output location {loc.uri}: {exc}. Check the endpoint "
                           "(AWS_ENDPOINT_URL), the bucket name and your network.") from None
    if finished and not overwrite:
        raise StorageError(f"{loc.uri} already contains a finished run; choose another output "
                           "location or pass --overwrite (overwrite=True) to replace it")


def _check_bucket_exists(loc: Location) -> None:
    bucket, _ = loc.bucket_and_key()
    if loc.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
        raise StorageError(f"bucket {bucket!r} of output location {loc.uri} not found; create "
                           "the bucket or correct its name")


def _write_local(loc: Location, files: dict[str, bytes | LocalFile]) -> None:
    try:
        _write_staged(loc.root, files)
    except OSError as exc:
        if exc.errno in _RECOVERABLE_ERRNOS:
            raise StorageWriteFailed(f"writing the run to {loc.uri} failed: {exc}. Nothing was "
                                     "committed. Run the command again once the cause is "
                                     "fixed.") from exc
        raise StorageError(f"cannot write the run to {loc.uri}: {exc}. Choose an output folder "
                           "you can write to.") from exc


def _write_staged(target: str, files: dict[str, bytes | LocalFile]) -> None:
    parent = os.path.dirname(target) or "."
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(target)}.rayq-{uuid.uuid4().hex[:8]}")
    try:
        for path, data in files.items():
            full = os.path.join(staging, path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            if isinstance(data, LocalFile):
                shutil.copyfile(data.path, full)
                continue
            with open(full, "wb") as handle:
                handle.write(data)
        if os.path.exists(target):
            retired = staging + ".old"
            os.rename(target, retired)
            os.rename(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass
class StoredRun:
    """A finished run read back from storage, with its checksums verified."""

    location: Location
    manifest: dict

    def read(self, path: str) -> bytes:
        data = self.location.read_bytes(path)
        expected = self.manifest["files"].get(path)
        if expected is None:
            raise StorageError(f"{self.location.uri}/{path} is not listed in the run's manifest")
        if hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise StorageError(f"{self.location.uri}/{path} is corrupted: its sha256 does not "
                               "match the manifest. Re-run the job to rewrite it.")
        return data

    def table(self, name: str) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read(f"{name}.parquet")))

    def verify(self) -> None:
        for path in self.manifest["files"]:
            self.read(path)


def open_run(location: str | Location) -> StoredRun:
    """Open a finished run; raise StorageError for a missing, incomplete or corrupted one."""
    loc = parse_location(location) if isinstance(location, str) else location
    try:
        has_manifest = loc.exists(MANIFEST)
        anything = has_manifest or bool(loc.list_files())
    except OSError as exc:
        raise StorageError(f"cannot reach {loc.uri}: {exc}") from None
    if not anything:
        raise StorageError(f"no run found at {loc.uri}: the location is empty or does not exist")
    if not has_manifest:
        raise StorageError(f"{loc.uri} contains an incomplete run: it has no {MANIFEST}, so the run "
                           "was interrupted or is still being written. Run the job again.")
    try:
        manifest = json.loads(loc.read_bytes(MANIFEST))
    except json.JSONDecodeError as exc:
        raise StorageError(f"{loc.uri}/{MANIFEST} is corrupted: {exc}") from None
    if manifest.get("format_version") != RUN_FORMAT_VERSION:
        raise StorageError(f"{loc.uri} was written in run format {manifest.get('format_version')!r}; "
                           f"this rayq reads format {RUN_FORMAT_VERSION}")
    return StoredRun(loc, manifest)


def load_run_model(run: StoredRun, model: nn.Module | None = None, trust_code: bool = False) -> nn.Module:
    """Rebuild the compressed module of a stored run."""
    config = json.loads(run.read(f"model/{model_io.CONFIG_FILE}"))
    # A model built block by block is stored as one safetensors file per block.
    names = config.get("weight_files", [model_io.WEIGHTS_FILE])
    weights = [run.read(f"model/{name}") for name in names]
    if model is None:
        from rayq.sources.models import load_source

        if not config.get("source"):
            raise StorageError(f"{run.location.uri} contains a model that was handed over in memory; "
                               "call rayq.load(location, model) with a float instance of it")
        model = load_source(config["source"], trust_code=trust_code).module
    return model_io.load_model_files(weights, config, model)
