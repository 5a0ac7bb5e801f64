"""Retrying S3 writes through transient failures, with exponential backoff.

A failure is transient when another attempt may succeed: the connection failed, was closed or
timed out, or the store returned a 5xx status or asked the client to slow down. Any other
failure (access denied, a missing bucket, missing credentials) is raised at once. These retries
wrap whole operations, such as the upload of one file, on top of botocore's retries of single
requests.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from rayq.errors import StorageError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Error codes that S3 and S3-compatible stores send for overload or a passing fault.
TRANSIENT_ERROR_CODES = frozenset({
    "InternalError", "RequestTimeout", "ServiceUnavailable", "SlowDown", "Throttling",
    "ThrottlingException", "RequestLimitExceeded",
})


class StorageWriteFailed(StorageError):
    """A write to a valid location failed on a transient error that outlasted the retries.

    The input was fine and the same command may succeed later, so the CLI exits with code 1 (a
    failed run), not 2 (invalid input).
    """

    exit_code = 1


@dataclass(frozen=True)
class RetryPolicy:
    """How many times a storage operation is attempted and how long to wait in between."""

    attempts: int = 5
    first_delay_s: float = 2.0
    max_delay_s: float = 30.0

    def delay_s(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (counted from 1)."""
        return min(self.max_delay_s, self.first_delay_s * 2 ** (attempt - 1))


# With these values one operation sleeps 2 + 4 + 8 + 16 = 30 s in all before it fails.
UPLOAD_RETRY = RetryPolicy()


def is_transient(error: BaseException) -> bool:
    if isinstance(error, (BotoConnectionError, HTTPClientError)):
        return True
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return code in TRANSIENT_ERROR_CODES or status >= 500
    return False


def next_delay_s(error: BaseException, attempt: int, policy: RetryPolicy) -> float | None:
    """Seconds to wait before the next attempt, or None when `error` should be raised now."""
    if attempt >= policy.attempts or not is_transient(error):
        return None
    return policy.delay_s(attempt)


def describe_error(error: BaseException) -> str:
    """Return the error's class and message, which name the operation or URL, not credentials."""
    return f"{type(error).__name__}: {error}"


def call_with_retries(action: Callable[[], T], operation: str, policy: RetryPolicy) -> T:
    """Call `action` until it succeeds, retrying transient botocore errors per `policy`.

    `operation` names what is attempted, with its location, for the log. The last error, or
    the first one that is not transient, is raised unchanged.
    """
    attempt = 1
    while True:
        try:
            return action()
        except (BotoCoreError, ClientError) as error:
            delay = next_delay_s(error, attempt, policy)
            if delay is None:
                raise
            logger.warning("%s failed on attempt %d of %d (%s); retrying in %.1f s", operation,
                           attempt, policy.attempts, describe_error(error), delay)
        time.sleep(delay)
        attempt += 1
