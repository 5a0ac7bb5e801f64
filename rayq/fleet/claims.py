"""Claims that keep two fleets from writing the same model's run at the same time.

A claim is a small JSON object at `<output root>/.claims/<name>.claim` holding its owner id and
an expiry time. It sits outside the model's run folder because writing a run replaces that
folder (locally) or deletes the files the new run does not contain (on S3).

- Creating a claim is a conditional create: `os.open` with O_CREAT | O_EXCL on a local folder,
  and a PUT with `If-None-Match: *` on S3, so of two fleets only one gets it.
- A claim whose expiry has passed was left by a fleet that crashed or lost its connection, so
  another fleet may take it over. On S3 it does so with a PUT conditional on the stale claim's
  ETag (`If-Match`). Locally it replaces the file under an exclusive `flock` on the claims folder.
- The owner renews its claims while it works and deletes them when it is done, on S3 with a
  DELETE conditional on its own claim's ETag.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass

from botocore.exceptions import ClientError

from rayq.errors import StorageError
from rayq.storage.location import Location, s3_client

logger = logging.getLogger(__name__)

CLAIMS_FOLDER = ".claims"
# S3 returns a failed condition with 412, and with 409 when a conflicting write is in flight.
# An unreadable claim younger than this may still be being written, so it is not taken over.
_WRITE_GRACE_S = 60.0
_CONDITION_FAILED = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}


def new_owner_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@dataclass
class Holder:
    """The current claim on a model: its owner and its expiry time (seconds since the epoch)."""

    owner: str
    expires_unix_s: float

    def expired(self, now: float) -> bool:
        return now >= self.expires_unix_s


class ClaimStore:
    """Create, renew and release the claims of one fleet (`owner`) under an output root."""

    def __init__(self, root: Location, owner: str, ttl_s: float):
        self.root = root
        self.owner = owner
        self.ttl_s = ttl_s
        # S3 ETag of each claim this fleet holds, for conditional renewal and release.
        self._etags: dict[str, str] = {}

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "created_unix_s": now,
                           "expires_unix_s": now + self.ttl_s}).encode()

    def acquire(self, name: str) -> Holder | None:
        """Claim `name`; return None on success, else the live claim of another fleet."""
        if self.root.is_local:
            return self._acquire_local(name)
        return self._acquire_s3(name)

    def renew(self, name: str) -> None:
        if self.root.is_local:
            self._replace_local(self._local_path(name))
            return
        self._put_s3(name, if_match=self._etags.get(name))

    def release(self, name: str) -> None:
        """Delete this fleet's claim on `name`; a claim another fleet took over stays."""
        try:
            if self.root.is_local:
                self._release_local(name)
            else:
                self._release_s3(name)
        except (OSError, ClientError) as exc:
            # The claim expires by itself, so a failed delete only delays other fleets.
            logger.warning("could not delete the claim on %s: %s", name, exc)

    # Local folders.

    def _local_path(self, name: str) -> str:
        return self.root.path(CLAIMS_FOLDER, f"{name}.claim")

    def _acquire_local(self, name: str) -> Holder | None:
        path = self._local_path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return self._take_over_local(path)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(self._body())
        return None

    def _take_over_local(self, path: str) -> Holder | None:
        # The lock is on the claims folder itself, so no lock file is left behind.
        folder = os.open(os.path.dirname(path), os.O_RDONLY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            return self._take_over_locked(path)
        finally:
            os.close(folder)  # closing releases the lock

    def _take_over_locked(self, path: str) -> Holder | None:
        holder = _read_local(path)
        if holder is None and _age_s(path) < _WRITE_GRACE_S:
            # An empty claim may be one that its creator is still writing.
            return Holder("a fleet that is writing its claim", time.time() + _WRITE_GRACE_S)
        if holder is not None and not holder.expired(time.time()):
            return holder
        # NOTE: a claim deleted and created anew by a third fleet between this read and the
        # replace would be overwritten; only takeovers take the lock, not creates.
        logger.warning("taking over the expired claim %s of %s", path,
                       holder.owner if holder else "an unreadable owner")
        self._replace_local(path)
        return None

    def _replace_local(self, path: str) -> None:
        temporary = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(temporary, "wb") as handle:
            handle.write(self._body())
        os.replace(temporary, path)

    def _release_local(self, name: str) -> None:
        path = self._local_path(name)
        holder = _read_local(path)
        if holder is not None and holder.owner == self.owner:
            os.remove(path)

    # S3.

    def _key(self, name: str) -> tuple[str, str]:
        return self.root.bucket_and_key(CLAIMS_FOLDER, f"{name}.claim")

    def _put_s3(self, name: str, if_match: str | None = None, if_none_match: bool = False) -> None:
        bucket, key = self._key(name)
        conditions = {"IfMatch": if_match} if if_match else {}
        if if_none_match:
            conditions["IfNoneMatch"] = "*"
        response = s3_client().put_object(Bucket=bucket, Key=key, Body=self._body(),
                                          ContentType="application/json", **conditions)
        self._etags[name] = response["ETag"]

    def _acquire_s3(self, name: str) -> Holder | None:
        try:
            self._put_s3(name, if_none_match=True)
            return None
        except ClientError as exc:
            if _error_code(exc) not in _CONDITION_FAILED:
                raise _storage_error(self.root, name, exc) from None
        holder, etag = self._read_s3(name)
        if holder is not None and not holder.expired(time.time()):
            return holder
        logger.warning("taking over the expired claim on %s of %s", name,
                       holder.owner if holder else "an unreadable owner")
        try:
            if etag is None:  # deleted since the create failed
                self._put_s3(name, if_none_match=True)
            else:
                self._put_s3(name, if_match=etag)
        except ClientError as exc:
            if _error_code(exc) not in _CONDITION_FAILED:
                raise _storage_error(self.root, name, exc) from None
            # Another fleet took it over first.
            holder, _ = self._read_s3(name)
            return holder or Holder("another fleet", time.time() + self.ttl_s)
        return None

    def _read_s3(self, name: str) -> tuple[Holder | None, str | None]:
        bucket, key = self._key(name)
        try:
            response = s3_client().get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) in {"NoSuchKey", "404"}:
                return None, None
            raise _storage_error(self.root, name, exc) from None
        return _parse(response["Body"].read()), response["ETag"]

    def _release_s3(self, name: str) -> None:
        etag = self._etags.pop(name, None)
        if etag is None:
            return
        bucket, key = self._key(name)
        try:
            s3_client().delete_object(Bucket=bucket, Key=key, IfMatch=etag)
        except ClientError as exc:
            if _error_code(exc) not in _CONDITION_FAILED | {"NoSuchKey", "404"}:
                raise


def remove_expired_claims(root: Location) -> list[str]:
    """Delete expired claims and leftover temporary claim files under a local root.

    Returns the removed file names. On S3 an expired claim is only ever replaced or deleted
    conditionally by the fleet that takes it, so this cleans local roots only.
    """
    folder = root.path(CLAIMS_FOLDER)
    if not root.is_local or not os.path.isdir(folder):
        return []
    removed = []
    now = time.time()
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        stale_temporary = entry.endswith(".tmp") and _age_s(path) > _WRITE_GRACE_S
        if entry.endswith(".claim"):
            holder = _read_local(path)
            stale_claim = (holder.expired(now) if holder else _age_s(path) > _WRITE_GRACE_S)
        else:
            stale_claim = False
        if stale_temporary or stale_claim:
            try:
                os.remove(path)
                removed.append(entry)
            except FileNotFoundError:
                continue
    try:
        os.rmdir(folder)  # only when empty: no claim is held
    except OSError:
        pass
    return removed


def _age_s(path: str) -> float:
    try:
        return time.time() - os.path.getmtime(path)
    except FileNotFoundError:
        return 0.0


def _read_local(path: str) -> Holder | None:
    try:
        with open(path, "rb") as handle:
            return _parse(handle.read())
    except FileNotFoundError:
        return None


def _parse(data: bytes) -> Holder | None:
    """Read a claim; an unreadable one (a crash mid-write) counts as expired."""
    try:
        record = json.loads(data)
        return Holder(str(record["owner"]), float(record["expires_unix_s"]))
    except (ValueError, KeyError, TypeError):
        return None


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _storage_error(root: Location, name: str, exc: ClientError) -> StorageError:
    return StorageError(f"cannot claim {name} under {root.uri}: {exc}. Check that the "
                        "credentials may read, write and delete objects under this prefix.")
