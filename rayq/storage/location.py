"""Output and input locations: a local path, `file://...` or `s3://bucket/prefix`.

S3 is read through pyarrow's S3 filesystem and written through a boto3 client (see
`rayq.storage.s3_write`), both with the standard AWS credential chain. Both take a custom endpoint
(MinIO, Ceph, a test server) from `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`, and the region
from `AWS_REGION` or `AWS_DEFAULT_REGION`. Credentials are never logged or stored.
"""

from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs

from rayq.errors import StorageError

logger = logging.getLogger(__name__)


@dataclass
class Location:
    """A folder on a filesystem; `uri` is what the user wrote, for messages."""

    fs: pafs.FileSystem
    root: str
    uri: str
    is_local: bool

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if parts else self.root

    def child(self, name: str) -> "Location":
        return Location(self.fs, self.path(name), self.uri.rstrip("/") + "/" + name, self.is_local)

    def exists(self, *parts: str) -> bool:
        info = self.fs.get_file_info(self.path(*parts))
        return info.type != pafs.FileType.NotFound

    def read_bytes(self, *parts: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.path(*parts)) as stream:
                return stream.read()
        except FileNotFoundError:
            raise StorageError(f"{self.describe(*parts)} not found") from None
        except OSError as exc:
            raise StorageError(f"cannot read {self.describe(*parts)}: {exc}") from None

    def describe(self, *parts: str) -> str:
        """Return the user's URI of a path under this location, for messages."""
        return "/".join([self.uri.rstrip("/"), *parts]) if parts else self.uri

    def bucket_and_key(self, *parts: str) -> tuple[str, str]:
        """Split an S3 location's path into its bucket and object key (empty for the bucket root)."""
        bucket, _, key = self.path(*parts).partition("/")
        return bucket, key

    def list_files(self) -> list[str]:
        """Relative paths of every file under the location."""
        selector = pafs.FileSelector(self.root, recursive=True, allow_not_found=True)
        files = []
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.File:
                files.append(posixpath.relpath(info.path, self.root))
        return sorted(files)


def s3_endpoint() -> str | None:
    """Return the custom S3 endpoint URL from the environment with a scheme, or None for AWS."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return None
    # A bare host:port gets HTTPS, pyarrow's default scheme, for both clients.
    return endpoint if "://" in endpoint else f"https://{endpoint}"


def s3_region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def s3_filesystem(bucket_hint: str | None = None) -> pafs.S3FileSystem:
    options = {"region": s3_region(),
               "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
               "connect_timeout": 5, "request_timeout": 30}
    endpoint = s3_endpoint()
    if endpoint:
        parsed = urlparse(endpoint)
        options["endpoint_override"] = parsed.netloc
        options["scheme"] = parsed.scheme
    return pafs.S3FileSystem(**options)


def s3_client():
    """Build a boto3 S3 client for the same endpoint and region as `s3_filesystem`.

    Each call builds a new client, so event handlers registered on one client stay with it.
    botocore makes up to 3 attempts per request, as pyarrow's retry strategy does for reads.
    """
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "total_max_attempts": 3}, connect_timeout=5,
                    read_timeout=30)
    return boto3.session.Session().client("s3", region_name=s3_region(),
                                          endpoint_url=s3_endpoint(), config=config)


def parse_location(uri: str) -> Location:
    """Resolve a user-given location; raises StorageError naming the value if it is malformed."""
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError(f"invalid location {uri!r}: expected a folder path, file://PATH or "
                           "s3://BUCKET/PREFIX")
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"invalid location {uri!r}: an S3 location needs a bucket, as in "
                               "s3://BUCKET/PREFIX")
        root = posixpath.join(parsed.netloc, parsed.path.lstrip("/")).rstrip("/")
        return Location(s3_filesystem(), root, uri, is_local=False)
    if parsed.scheme == "file":
        return Location(pafs.LocalFileSystem(), os.path.abspath(parsed.path), uri, is_local=True)
    if parsed.scheme and len(parsed.scheme) > 1:
        raise StorageError(f"unsupported location {uri!r}: use a local path, file://PATH or "
                           "s3://BUCKET/PREFIX")
    return Location(pafs.LocalFileSystem(), os.path.abspath(uri), uri, is_local=True)
