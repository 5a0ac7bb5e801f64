"""Job files and flags merged into one validated `JobConfig`: flags override the file."""

from __future__ import annotations

import os
from typing import Any

import yaml
from pydantic import ValidationError

from rayq.config import JobConfig, format_validation_error
from rayq.errors import ConfigError


def read_job_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"job file {path!r} not found; check the path")
    try:
        with open(path) as handle:
            data = yaml.safe_load(handle)
    except yaml.YAMLError as exc:
        raise ConfigError(f"job file {path!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"job file {path!r} must hold a mapping of settings, "
                          f"not a {type(data).__name__}")
    return data


def build_job(file_values: dict[str, Any], flag_values: dict[str, Any],
              job_path: str | None) -> JobConfig:
    """Validate the merged settings; every problem is reported at once.

    An error names a setting as its option (`--threshold`) where the command line gave it, and
    as its key where the job file did.
    """
    flags = {k: v for k, v in flag_values.items() if v is not None}
    merged = {**file_values, **flags}
    if job_path and flags:
        source = f"{job_path} and command-line options"
    else:
        source = job_path or "command-line options"
    try:
        return JobConfig(**merged)
    except ValidationError as exc:
        raise format_validation_error(exc, source, frozenset(flags)) from None
