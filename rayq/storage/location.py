"""Output and input locations: a local path, `file://...` or `s3://bucket/prefix`.

S3 goes through pyarrow's S3 filesystem with the standard AWS credential chain. A custom
endpoint (MinIO, Ceph, a test server) comes from `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`, and
the region from `AWS_REGION` or `AWS_DEFAULT_REGION`. Credentials are never logged or stored.
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
            raise StorageError(f"{self.uri.rstrip('/')}/{'/'.join(parts)} not found") from None
        except OSError as exc:
            raise StorageError(f"cannot read {self.uri.rstrip('/')}/{'/'.join(parts)}: {exc}") from None

    def write_bytes(self, data: bytes, *parts: str) -> None:
        target = self.path(*parts)
        self.fs.create_dir(posixpath.dirname(target), recursive=True)
        with self.fs.open_output_stream(target) as stream:
            stream.write(data)

    def list_files(self) -> list[str]:
        """Relative paths of every file under the location."""
        selector = pafs.FileSelector(self.root, recursive=True, allow_not_found=True)
        files = []
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.File:
                files.append(posixpath.relpath(info.path, self.root))
        return sorted(files)


def s3_filesystem(bucket_hint: str | None = None) -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    options = {"region": region, "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
               "connect_timeout": 5, "request_timeout": 30}
    if endpoint:
        parsed = urlparse(endpoint)
        options["endpoint_override"] = parsed.netloc or parsed.path
        options["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**options)


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
