"""Writing a run to S3: the previous run retired, every file uploaded, the manifest last.

Files go up through boto3's managed transfer, which splits a file of
`TRANSFER.multipart_threshold` bytes or more into parts uploaded in parallel. Every operation is retried
through transient failures (see `rayq.storage.retry`).

A multipart upload that a failed attempt started is aborted, so its parts do not stay in the
bucket: boto3 aborts it when the attempt fails, and `write_files` aborts it again at the end of
the write, because the store may have been unreachable at the first try. Only uploads that this
write started are aborted, found by the ids in this client's CreateMultipartUpload responses.
"""

from __future__ import annotations

import functools
import logging
import threading
from contextlib import contextmanager
from typing import Callable, TypeVar

from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from rayq.errors import StorageError
from rayq.storage import retry
from rayq.storage.files import LocalFile, open_data
from rayq.storage.location import Location, s3_client
from rayq.storage.retry import StorageWriteFailed, call_with_retries, describe_error, is_transient

logger = logging.getLogger(__name__)

T = TypeVar("T")

MIB = 1024 * 1024
# 8 MiB is boto3's default threshold and part size.
TRANSFER = TransferConfig(multipart_threshold=8 * MIB, multipart_chunksize=8 * MIB,
                          max_concurrency=8)


def write_files(loc: Location, files: dict[str, bytes | LocalFile], manifest_path: str) -> None:
    """Upload `files` in order, `manifest_path` last, after deleting the old manifest first.

    Old files under the location that the new run does not replace are deleted too. Raises
    StorageWriteFailed (exit code 1) when a transient failure outlasts the retries, and
    StorageError (exit code 2) when the store rejects a request.
    """
    policy = retry.UPLOAD_RETRY
    client = s3_client()
    uploads = _MultipartUploads(client)
    ordered = [path for path in files if path != manifest_path] + [manifest_path]
    try:
        _retire_previous_run(client, loc, set(files), manifest_path, policy)
        for path in ordered:
            _upload(client, loc, path, files[path], uploads, policy)
    finally:
        uploads.abort_failed(client)


def put_file(loc: Location, path: str, data: bytes) -> None:
    """Upload one file under `loc`, retried through transient failures like a run's files."""
    client = s3_client()
    uploads = _MultipartUploads(client)
    try:
        _upload(client, loc, path, data, uploads, retry.UPLOAD_RETRY)
    finally:
        uploads.abort_failed(client)


def _uri(loc: Location, path: str) -> str:
    return f"{loc.uri.rstrip('/')}/{path}"


def _call(action: Callable[[], T], operation: str, loc: Location, policy: retry.RetryPolicy) -> T:
    try:
        return call_with_retries(action, operation, policy)
    except (BotoCoreError, ClientError) as error:
        raise _storage_error(operation, loc, error, policy) from error


def _storage_error(operation: str, loc: Location, error: Exception,
                   policy: retry.RetryPolicy) -> StorageError:
    if is_transient(error):
        return StorageWriteFailed(
            f"{operation} failed after {policy.attempts} attempts ({describe_error(error)}). "
            f"The new run at {loc.uri} was not committed, because its manifest.json was not "
            "written; run the command again once the store is reachable.")
    if isinstance(error, NoCredentialsError):
        return StorageError(f"{operation} failed: no AWS credentials found. Set "
                            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE.")
    return StorageError(f"{operation} was rejected ({describe_error(error)}). Check the bucket "
                        f"in {loc.uri} and that your credentials may write and delete objects "
                        "under it.")


def _retire_previous_run(client, loc: Location, keep: set[str], manifest_path: str,
                         policy: retry.RetryPolicy) -> None:
    """Delete the old manifest, then the old files that the new run does not replace.

    The manifest goes first, so a reader never sees old and new files under one manifest.
    """
    bucket, prefix = loc.bucket_and_key()
    folder = f"{prefix}/" if prefix else ""
    keys = _call(functools.partial(_list_keys, client, bucket, folder), f"listing of {loc.uri}",
                 loc, policy)
    old = {key[len(folder):] for key in keys}
    stale = ([manifest_path] if manifest_path in old else []) + sorted(old - keep)
    for path in stale:
        _call(functools.partial(client.delete_object, Bucket=bucket, Key=folder + path),
              f"deletion of {_uri(loc, path)}", loc, policy)


def _list_keys(client, bucket: str, folder: str) -> list[str]:
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return keys


def _upload(client, loc: Location, path: str, data: bytes | LocalFile, uploads: "_MultipartUploads",
            policy: retry.RetryPolicy) -> None:
    bucket, key = loc.bucket_and_key(path)

    def attempt() -> None:
        with uploads.watch(), open_data(data) as stream:
            client.upload_fileobj(stream, bucket, key, Config=TRANSFER)

    _call(attempt, f"upload of {_uri(loc, path)}", loc, policy)
    logger.debug("uploaded %s (%d bytes)", _uri(loc, path), len(data))


class _MultipartUploads:
    """The multipart uploads that one client started, and those of them whose attempt failed.

    NOTE: an upload whose CreateMultipartUpload response never arrived is unknown to the client
    and stays in the bucket until a lifecycle rule (AbortIncompleteMultipartUpload) removes it.
    """

    def __init__(self, client):
        self._lock = threading.Lock()
        self._started: list[tuple[str, str, str]] = []  # (bucket, key, upload id)
        self.failed: list[tuple[str, str, str]] = []
        client.meta.events.register("after-call.s3.CreateMultipartUpload", self._record)

    def _record(self, parsed: dict, **_) -> None:
        # botocore calls this on boto3's transfer threads.
        if "UploadId" in parsed:
            with self._lock:
                self._started.append((parsed["Bucket"], parsed["Key"], parsed["UploadId"]))

    @contextmanager
    def watch(self):
        """Mark the uploads started inside the block as failed when the block raises."""
        with self._lock:
            first = len(self._started)
        try:
            yield
        except BaseException:
            with self._lock:
                self.failed.extend(self._started[first:])
            raise

    def abort_failed(self, client) -> None:
        for bucket, key, upload_id in self.failed:
            try:
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") == "NoSuchUpload":
                    continue  # boto3 aborted it when its attempt failed
                _warn_not_aborted(bucket, key, upload_id, error)
            except BotoCoreError as error:
                _warn_not_aborted(bucket, key, upload_id, error)
            else:
                logger.info("aborted the unfinished multipart upload of s3://%s/%s", bucket, key)


def _warn_not_aborted(bucket: str, key: str, upload_id: str, error: Exception) -> None:
    logger.warning("failed to abort multipart upload %s of s3://%s/%s (%s). Its parts stay in "
                   "the bucket until it is aborted or a lifecycle rule with "
                   "AbortIncompleteMultipartUpload removes it", upload_id, bucket, key,
                   describe_error(error))
