"""Run files that are already on local disk, written without reading them into memory whole."""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from typing import BinaryIO

CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class LocalFile:
    """A file on local disk that a run includes, such as one block of a streamed model."""

    path: str

    def __len__(self) -> int:
        return os.path.getsize(self.path)

    def sha256(self) -> str:
        digest = hashlib.sha256()
        with open(self.path, "rb") as handle:
            for chunk in iter(lambda: handle.read(CHUNK), b""):
                digest.update(chunk)
        return digest.hexdigest()


def sha256_of(data: bytes | LocalFile) -> str:
    return data.sha256() if isinstance(data, LocalFile) else hashlib.sha256(data).hexdigest()


def open_data(data: bytes | LocalFile) -> BinaryIO:
    """Open a readable binary stream of the file's content."""
    return open(data.path, "rb") if isinstance(data, LocalFile) else io.BytesIO(data)
