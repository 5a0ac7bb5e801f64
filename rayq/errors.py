"""Errors that rayq raises for problems a user can fix.

Every user error names the offending value and what to do instead. The CLI prints the message
without a traceback and exits with code 2; any other exception is a failed run (exit code 1).
"""

from __future__ import annotations


class RayqError(Exception):
    """Base class for invalid input: a bad value, a missing file, a model that cannot run."""

    exit_code = 2

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        full = message
        if self.problems:
            full = message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(full)
        self.message = message

    def __reduce__(self):
        # Keep the fields when the error crosses a Ray actor boundary.
        return (type(self), (self.message, self.problems))


class ConfigError(RayqError):
    """A job setting is invalid."""


class ModelError(RayqError):
    """The model cannot be loaded, or cannot run on the calibration data."""


class DataError(RayqError):
    """Calibration or evaluation data is missing, empty or does not fit the model."""


class StorageError(RayqError):
    """An output location cannot be read or written."""


class RunFailedError(Exception):
    """A run that failed for a reason other than invalid input (exit code 1)."""

    exit_code = 1
