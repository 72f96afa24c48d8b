"""Where ingested items' raw bytes are kept, so a later model can re-embed them (backfill).

Content-addressed files under ``<data_dir>/blobs/ab/abcdef...``; the item's ``source_uri`` is
``blob:<sha256>``. A blob is written and fsynced *before* the SQL transaction that references it commits,
so an acknowledged item always has its source. The ingest path removes the blobs of a write that failed,
and of deleted items, once no stored item references them (:mod:`service.serving.ingest`). The folders are
made again when missing (say, removed while serving).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from index import atomic

SCHEME = "blob:"
_HEX = re.compile(r"^[0-9a-f]{64}$")
OPAQUE = "application/octet-stream"


def media_type(data: bytes) -> str:
    """The image type of ``data`` by its magic bytes (PNG, JPEG, WebP), else ``application/octet-stream``."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return OPAQUE


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def put(self, data: bytes) -> str:
        """Store ``data`` (idempotent) and return its ``blob:<sha256>`` URI."""
        digest = hashlib.sha256(data).hexdigest()
        path = self._path(digest)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)  # the blobs folder may have been removed
            # temp file, fsync, rename, fsync of the folder: the source of an acknowledged item survives a
            # power loss, not only a kill
            atomic.write_bytes(path, data)
        return SCHEME + digest

    def delete(self, uri: str) -> bool:
        """Remove the bytes behind a ``blob:`` URI of ours; False if it is not one or is already gone."""
        if not uri.startswith(SCHEME) or not _HEX.match(uri[len(SCHEME) :]):
            return False
        try:
            self._path(uri[len(SCHEME) :]).unlink()
        except FileNotFoundError:
            return False
        return True

    def exists(self, uri: str) -> bool:
        """Whether the bytes behind a ``blob:`` URI of ours are here (a stat, no read)."""
        if not uri.startswith(SCHEME) or not _HEX.match(uri[len(SCHEME) :]):
            return False
        return self._path(uri[len(SCHEME) :]).is_file()

    def get(self, uri: str) -> bytes | None:
        """The bytes behind a ``blob:`` URI, or None if it is not one of ours or is missing."""
        if not uri.startswith(SCHEME) or not _HEX.match(uri[len(SCHEME) :]):
            return None
        try:
            return self._path(uri[len(SCHEME) :]).read_bytes()
        except FileNotFoundError:
            return None
