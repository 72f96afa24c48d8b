"""Reading an item's kept source for a backfill, the same way in both engines (the local thread, Ray actors):
either the decoded image, or the reason the item is skipped."""

from __future__ import annotations

import numpy as np

from service.blobs import BlobStore
from service.errors import BadImage, TooLarge
from service.images import decode_image
from trainer import Preprocess


def read_source(
    blobs: BlobStore,
    uri: str | None,
    *,
    prep: Preprocess,
    max_pixels: int,
    external_id: str,
    candidate: str,
) -> np.ndarray | str:
    """The (C, H, W) uint8 image behind ``uri`` under the candidate's contract ``prep``, or (a str) why the
    item cannot be re-embedded: no source kept, not in the blob store, or not decodable/too large."""
    if uri is None:
        return "no source kept (ingested while keep_sources was off)"
    raw = blobs.get(uri)
    if raw is None:
        return f"source {uri[:80]} is not in the blob store"
    try:
        return decode_image(raw, prep=prep, max_pixels=max_pixels, what=f"item {external_id!r}")
    except (BadImage, TooLarge) as e:
        return f"source does not fit {candidate}: {e}"
