"""A seeded sample of the gallery's kept sources as one ZIP: unlabeled images for training a new model.

``graceful train --old v1 --bct --unlabeled DIR`` takes a folder of images; this gives one from a running
gallery. The sample is a function of ``(seed, the set of items with a kept source)`` only: those items are
sorted by item id and ``numpy.random.default_rng(seed).choice`` draws ``sample`` of them without replacement
(all of them when ``sample`` is at least their count). Each drawn source is stored under a name that cannot
escape a folder, ``<item_id>.<png|jpg|webp|bin>`` (the extension from its magic bytes), next to
``manifest.json`` (what was asked, what was written and skipped, and each file's external id and the
version that embedded it in each space).

Only reads: nothing stored changes. The archive is written to a spooled temporary file (in memory up to
:data:`SPOOL_BYTES`, then on disk) so a large gallery's export never sits whole in RAM; entries are stored,
not deflated, as PNG/JPEG/WebP are compressed already, and carry a fixed date so the same sample gives the
same bytes.
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from index import Gallery
from service.blobs import OPAQUE, BlobStore, media_type
from service.errors import BadRequest, NothingToExport

FORMAT = "graceful-sources-export/1"
MANIFEST = "manifest.json"
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", OPAQUE: "bin"}
SPOOL_BYTES = 8 * 1024 * 1024  # an archive this small stays in memory; a larger one rolls over to disk
_DATE = (1980, 1, 1, 0, 0, 0)  # ZIP's earliest date: entries carry no time, so one sample is one archive


@dataclass
class SourcesExport:
    """A finished archive: ``file`` (binary, positioned at 0; the caller closes it), its ``size`` in bytes,
    and the manifest it holds."""

    file: IO[bytes]
    size: int
    manifest: dict[str, Any]

    def chunks(self, size: int = 1024 * 1024) -> Iterator[bytes]:
        """The archive's bytes, ``size`` at a time; closes the file at the end (or when abandoned)."""
        try:
            while chunk := self.file.read(size):
                yield chunk
        finally:
            self.file.close()


def sample_kept(
    sources: Sequence[tuple[int, str, str | None]], sample: int, seed: int
) -> list[tuple[int, str, str]]:
    """The ``(item_id, external_id, source_uri)`` drawn from the items of ``sources`` that have a source:
    sorted by item id, ``sample`` of them drawn by ``default_rng(seed)`` without replacement (all when
    ``sample`` >= their count). Returned in item id order."""
    kept = sorted((i, e, u) for i, e, u in sources if u is not None)
    if sample >= len(kept):
        return kept
    drawn = np.sort(np.random.default_rng(seed).choice(len(kept), size=sample, replace=False))
    return [kept[int(j)] for j in drawn]


def _entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_DATE)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16  # a plain file, readable: unzip tools otherwise write mode 000
    return info


def export_sources(
    gallery: Gallery, blobs: BlobStore, sample: int, seed: int, max_sample: int
) -> SourcesExport:
    """Write a ZIP of ``sample`` seeded-drawn kept sources (see the module docstring).

    :class:`BadRequest` when ``sample`` is not in 1..``max_sample`` or ``seed`` is negative;
    :class:`NothingToExport` when no item has a kept source (or none of the drawn sources is in the store).
    """
    if isinstance(sample, bool) or not 1 <= sample <= max_sample:
        raise BadRequest(
            f"sample must be between 1 and {max_sample} (GRACEFUL_EXPORT_MAX_SAMPLE), got {sample}"
        )
    if seed < 0:
        raise BadRequest(f"seed must be a non-negative integer, got {seed}")
    sources = gallery.item_sources()
    chosen = sample_kept(sources, sample, seed)
    with_source = sum(u is not None for _, _, u in sources)
    if not chosen:
        raise NothingToExport(
            "nothing to export: the gallery has no items"
            if not sources
            else f"nothing to export: none of the gallery's {len(sources)} items has a kept source image "
            "(they were ingested while GRACEFUL_KEEP_SOURCES was off, or as vectors)"
        )
    # one SQL round trip per 500 ids; an item deleted since is simply absent (its blob is then skipped too)
    records = gallery.get_items([e for _, e, _ in chosen])
    files: list[dict[str, Any]] = []
    missing = 0
    f = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 - handed to the caller open
    try:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for item_id, external_id, uri in chosen:
                data = blobs.get(uri)
                if data is None:  # deleted (with its blob) since the listing, or the blob lost on disk
                    missing += 1
                    continue
                kind = media_type(data)
                name = f"{item_id}.{EXTENSIONS[kind]}"
                zf.writestr(_entry(name), data)
                rec = records.get(external_id)
                files.append(
                    {
                        "file": name,
                        "item_id": item_id,
                        "external_id": external_id,
                        "media_type": kind,
                        "bytes": len(data),
                        "embedded_by": dict(rec.embedded_by) if rec is not None else {},
                    }
                )
            if not files:
                raise NothingToExport(
                    f"nothing to export: the {len(chosen)} sampled sources are missing from the blob store"
                )
            manifest = {
                "format": FORMAT,
                "seed": seed,
                "sample": sample,
                "items": len(sources),
                "with_source": with_source,
                "without_source": len(sources) - with_source,  # skipped: nothing kept to export
                "missing_from_store": missing,
                "written": len(files),
                "files": files,
            }
            zf.writestr(_entry(MANIFEST), json.dumps(manifest, indent=1).encode())
        size = f.tell()
        f.seek(0)
    except BaseException:
        f.close()
        raise
    return SourcesExport(file=f, size=size, manifest=manifest)
