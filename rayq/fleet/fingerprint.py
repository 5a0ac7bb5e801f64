"""The fingerprint of a job: sha256 over the model's weights, the data and the effective config.

A finished run whose manifest carries the same fingerprint as a new job computes the same
result, so `rayq zoo` skips the job. The parts (weights, data, config) are stored separately
too, so the fleet table can name the one that changed.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from torch import nn

from rayq.config import EXECUTION_ONLY, JobConfig
from rayq.sources.data import PYDOC, pydoc_paragraphs
from rayq.storage.location import parse_location

# Bumped when what goes into a fingerprint changes, so old runs are redone rather than skipped.
FINGERPRINT_VERSION = 1
_CHUNK = 1 << 20


def job_fingerprint(job: JobConfig, source: dict, module: nn.Module | None = None) -> dict:
    """Return {"sha256": ..., "parts": {"weights", "data", "config"}} for a job.

    Weights of a Hugging Face folder or a packaged model are the folder's files. A Python
    factory's weights are the tensors of `module`, the model it returned with any weights loaded.
    NOTE: a change to a factory's code that leaves its tensors, names and shapes as they were
    (a new forward) is not seen; `rayq zoo --force` compresses such a model again.
    """
    parts = {
        "weights": _weights_digest(source, module),
        "data": _data_digest([job.calibration, job.evaluation]),
        "config": _config_digest(job),
    }
    total = hashlib.sha256(f"rayq-fingerprint-v{FINGERPRINT_VERSION}".encode())
    for key in sorted(parts):
        total.update(f"{key}={parts[key]};".encode())
    return {"sha256": total.hexdigest(), "parts": parts}


def changed_parts(old: dict | None, new: dict) -> list[str]:
    """Name the parts that differ between two fingerprints (all of them when `old` is missing)."""
    old_parts = (old or {}).get("parts") or {}
    return [key for key in sorted(new["parts"]) if old_parts.get(key) != new["parts"][key]]


def _weights_digest(source: dict, module: nn.Module | None) -> str:
    kind = source.get("kind")
    if kind in ("huggingface", "package"):
        from rayq.sources.models import package_folder

        folder = source["path"] if kind == "huggingface" else str(package_folder(source["package"]))
        return _folder_digest(folder)
    if module is None:
        raise ValueError("a Python factory's fingerprint needs the model it returned")
    return state_dict_digest(module)


def _folder_digest(folder: str) -> str:
    digest = hashlib.sha256()
    for base, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(base, name)
            digest.update(os.path.relpath(path, folder).encode() + b"\0")
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(_CHUNK), b""):
                    digest.update(block)
    return digest.hexdigest()


def state_dict_digest(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        if data.numel():
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _data_digest(specs: list[str | None]) -> str:
    digest = hashlib.sha256()
    for spec in specs:
        digest.update(b"\0" if spec is None else _spec_bytes(spec))
        digest.update(b"\1")
    return digest.hexdigest()


def _spec_bytes(spec: str) -> bytes:
    if spec == PYDOC:
        # The text changes with the Python version, so its content is hashed, not its name.
        return "\n\n".join(pydoc_paragraphs()).encode()
    location = parse_location(spec)
    if location.is_local:
        with open(location.root, "rb") as handle:
            return handle.read()
    return location.read_bytes()


def _config_digest(job: JobConfig) -> str:
    # Only settings that change the result count: workers, addresses and the output do not.
    config = job.model_dump(mode="json", exclude=set(EXECUTION_ONLY))
    config.pop("model_weights", None)  # the weights themselves are hashed
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
