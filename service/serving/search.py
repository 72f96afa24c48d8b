"""Search by image as a batch: one model forward and one FAISS search for every query of a micro-batch.

The batch's key is the :class:`~service.registry.ActiveModel` every query in it captured when its request
started (see :mod:`service.batching`), so the model that embeds a query is the one its answer names, even
when a hot swap happens while it waits. Metadata of all hits is read in one SQL round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from index import Gallery
from service.observability import Metrics
from service.registry import ActiveModel
from service.schemas import SearchHit, SearchResponse


@dataclass(frozen=True, slots=True)
class SearchJob:
    """One query: ``image`` (C, H, W) uint8 in the model's input format, already validated."""

    image: np.ndarray
    k: int
    include_metadata: bool = True


def run_search_batch(
    gallery: Gallery, active: ActiveModel, jobs: Sequence[SearchJob], metrics: Metrics | None = None
) -> list[SearchResponse]:
    """Embed ``jobs``' images with ``active`` in one forward, search its space once with the largest k,
    and cut each answer to its own k. Returns one response per job, in order."""
    vectors = active.embed(np.stack([j.image for j in jobs]))  # (n, d) float32, unit rows
    if metrics is not None:
        metrics.embedded.labels(version=active.version, purpose="query").inc(len(jobs))
    found = gallery.search(active.space, vectors, max(j.k for j in jobs))
    hits = [h[: j.k] for h, j in zip(found, jobs, strict=True)]
    wanted = {h.external_id for hs, j in zip(hits, jobs, strict=True) if j.include_metadata for h in hs}
    meta = gallery.get_metadata(wanted) if wanted else {}
    return [
        SearchResponse(model_version=active.version, space=active.space, hits=[
            SearchHit(external_id=h.external_id, score=h.score, embedded_by=h.embedded_by,
                      metadata=meta.get(h.external_id) if j.include_metadata else None)
            for h in hs
        ])
        for hs, j in zip(hits, jobs, strict=True)
    ]
