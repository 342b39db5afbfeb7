"""Where an image-table row's encoded image comes from: its stored bytes, or its file.

The image table holds metadata by default (``ingest.store_content: false``), so the stages
that decode images read each file from its path, in the executor, when they decode it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pipeline.core import storage
from pipeline.core.imageio import ImageDecodeError


@dataclass(frozen=True)
class StoredFile:
    """An image the image table did not copy (``ingest.store_content: false``), read from its
    path when it is decoded (``imageio.decode_rgb`` calls ``read``). Checked against the hash ingest recorded, so a file replaced since
    then becomes an error row instead of a different image under the old hash."""

    path: str
    sha256: str | None = None

    def read(self) -> bytes:
        try:
            content = storage.read_file(self.path)
        except OSError as exc:
            raise ImageDecodeError(f"unreadable file: {exc.strerror or exc}") from exc
        if self.sha256 is not None and hashlib.sha256(content).hexdigest() != self.sha256:
            raise ImageDecodeError("file changed since ingest (run ingest again)")
        return content


def sources(contents, paths, hashes) -> list:
    """Per row, the stored bytes or a :class:`StoredFile` to read them from (image-table columns)."""
    return [bytes(c) if c is not None else (StoredFile(p, h) if p is not None else None)
            for c, p, h in zip(contents, paths, hashes)]
