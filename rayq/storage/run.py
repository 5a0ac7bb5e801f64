"""A run on storage: the files of DESIGN's layout, written safely, with the manifest last.

A local run is written into a hidden staging folder beside the target and renamed into place, so
a location never holds files of two runs and an interrupted write leaves nothing behind. On S3,
files are uploaded first and `manifest.json` last; a location without a manifest is an
incomplete run, and readers say so.
"""

from __future__ import annotations

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
import pyarrow.parquet as pq
from torch import nn

from rayq.engine.summary import summary_text
from rayq.errors import StorageError
from rayq.storage import model_io
from rayq.storage.location import Location, parse_location

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
RUN_FORMAT_VERSION = 1
TABLES = ("sensitivity", "plan", "thresholds")
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
    """Every file of a run except the manifest, as bytes keyed by relative path."""
    files = {}
    with tempfile.TemporaryDirectory() as folder:
        model_io.save_model(result.model, folder, result.folded, source)
        for name in (model_io.WEIGHTS_FILE, model_io.CONFIG_FILE):
            with open(os.path.join(folder, name), "rb") as handle:
                files[f"model/{name}"] = handle.read()
    for name in TABLES:
        files[f"{name}.parquet"] = _parquet_bytes(getattr(result, name))
    files["summary.txt"] = summary_text(result.thresholds, result.plan).encode()
    return files


def manifest_for(files: dict[str, bytes], config: dict, workers: list[dict],
                 extra: dict | None = None) -> dict:
    return {
        "format_version": RUN_FORMAT_VERSION,
        "created_unix_s": time.time(),
        "config": config,
        "versions": package_versions(),
        "workers": workers,
        "files": {path: {"size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                  for path, data in sorted(files.items())},
        **(extra or {}),
    }


def write_run(result, location: str | Location, config: dict, source: dict | None = None,
              overwrite: bool = False, extra: dict | None = None) -> Location:
    """Write a run's files and then its manifest; refuse to replace a finished run by default."""
    loc = parse_location(location) if isinstance(location, str) else location
    check_writable(loc, overwrite)
    files = run_files(result, source)
    manifest = manifest_for(files, config, result.workers, {"source": source, **(extra or {})})
    files_with_manifest = {**files, MANIFEST: json.dumps(manifest, indent=2).encode()}
    if loc.is_local:
        _write_local(loc, files_with_manifest)
    else:
        _write_remote(loc, files, files_with_manifest[MANIFEST])
    logger.info("wrote run to %s (%d files)", loc.uri, len(files_with_manifest))
    return loc


def check_writable(loc: Location, overwrite: bool) -> None:
    try:
        finished = loc.exists(MANIFEST)
    except OSError as exc:
        raise StorageError(f"cannot reach output location {loc.uri}: {exc}. Check the endpoint "
                           "(AWS_ENDPOINT_URL), the bucket name and your network.") from None
    if finished and not overwrite:
        raise StorageError(f"{loc.uri} already contains a finished run; choose another output "
                           "location or pass --overwrite (overwrite=True) to replace it")


def _write_local(loc: Location, files: dict[str, bytes]) -> None:
    target = loc.root
    parent = os.path.dirname(target) or "."
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(target)}.rayq-{uuid.uuid4().hex[:8]}")
    try:
        for path, data in files.items():
            full = os.path.join(staging, path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
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


def _write_remote(loc: Location, files: dict[str, bytes], manifest: bytes) -> None:
    # Retire the old manifest first, so a reader never sees old and new files under one manifest.
    if loc.exists(MANIFEST):
        loc.fs.delete_file(loc.path(MANIFEST))
    for old in loc.list_files():
        if old not in files:
            loc.fs.delete_file(loc.path(old))
    for path, data in files.items():
        loc.write_bytes(data, path)
    loc.write_bytes(manifest, MANIFEST)


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
    weights = run.read(f"model/{model_io.WEIGHTS_FILE}")
    if model is None:
        from rayq.sources.models import load_source

        if not config.get("source"):
            raise StorageError(f"{run.location.uri} contains a model that was handed over in memory; "
                               "call rayq.load(location, model) with a float instance of it")
        model = load_source(config["source"], trust_code=trust_code).module
    return model_io.load_model_files(weights, config, model)
