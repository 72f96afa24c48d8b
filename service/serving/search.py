"""The search path: one call from a parsed query to its answer.

Image queries go through the search micro-batcher (:mod:`service.serving.batching`): one model forward for
every query of a micro-batch and one FAISS search per metadata filter among them (all the unfiltered ones
together). The batch's key is the
:class:`~service.models.hot_swap.ActiveModel` every query in it captured when its request started, so the
model that embeds a query is the one its answer names, even when a hot swap happens while it waits.
Vector and item queries need no forward and run in the thread pool. Metadata of all hits is read in one SQL
round trip. Every search answers within its deadline or raises 503/504 errors (:mod:`service.serving.deadlines`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial

import numpy as np

from index import Gallery
from index.errors import UnknownVersion
from index.filters import MetadataFilter
from index.types import Hit
from service.errors import IncompatibleModel, ModelNotFound
from service.images import decode_image
from service.models.hot_swap import ActiveModel, HotSwap, backfill_report_url
from service.observability import Metrics
from service.schemas import SearchHit, SearchResponse
from service.serving.batching import BatchBounds, MicroBatcher
from service.serving.deadlines import result_within, run_within
from service.serving.shadow import ShadowTraffic
from trainer import NoImageModel


@dataclass(frozen=True, slots=True)
class ImageQuery:
    """Encoded image bytes (PNG/JPEG), embedded by the active model."""

    raw: bytes
    k: int
    include_metadata: bool = True
    filter: MetadataFilter | None = None


@dataclass(frozen=True, slots=True)
class VectorQuery:
    """A vector with the version that embedded it."""

    vector: list[float]
    model_version: str
    k: int
    include_metadata: bool = True
    filter: MetadataFilter | None = None


@dataclass(frozen=True, slots=True)
class ItemQuery:
    """A stored item's embedding (the item itself is left out of the hits)."""

    item_id: str
    k: int
    include_metadata: bool = True
    filter: MetadataFilter | None = None


Query = ImageQuery | VectorQuery | ItemQuery


@dataclass(frozen=True, slots=True)
class SearchJob:
    """One image query of a micro-batch: ``image`` (C, H, W) uint8 in the model's input format, validated."""

    image: np.ndarray
    k: int
    include_metadata: bool = True
    filter: MetadataFilter | None = None
    raw: bytes | None = None  # the encoded image, for a shadow model with another input contract


def run_search_batch(
    gallery: Gallery, active: ActiveModel, jobs: Sequence[SearchJob], metrics: Metrics | None = None
) -> list[SearchResponse]:
    """Embed ``jobs``' images with ``active`` in one forward, search its space once per filter (the
    unfiltered jobs together, the jobs of one filter together) with the largest k of those jobs, and cut
    each answer to its own k. Returns one response per job, in order."""
    vectors = active.embed(np.stack([j.image for j in jobs]))  # (n, d) float32, unit rows
    if metrics is not None:
        metrics.embedded.labels(version=active.version, purpose="query").inc(len(jobs))
    groups: dict[MetadataFilter | None, list[int]] = {}
    for i, j in enumerate(jobs):
        groups.setdefault(j.filter, []).append(i)
    found: list[list[Hit]] = [[] for _ in jobs]
    for flt, rows in groups.items():
        group = vectors if len(rows) == len(jobs) else vectors[rows]
        for i, h in zip(
            rows, gallery.search(active.space, group, max(jobs[i].k for i in rows), filter=flt), strict=True
        ):
            found[i] = h
    hits = [h[: j.k] for h, j in zip(found, jobs, strict=True)]
    wanted = {h.external_id for hs, j in zip(hits, jobs, strict=True) if j.include_metadata for h in hs}
    meta = gallery.get_metadata(wanted) if wanted else {}
    return [
        SearchResponse(
            model_version=active.version,
            space=active.space,
            hits=[
                SearchHit(
                    external_id=h.external_id,
                    score=h.score,
                    embedded_by=h.embedded_by,
                    route=h.route,
                    metadata=meta.get(h.external_id) if j.include_metadata else None,
                )
                for h in hs
            ],
        )
        for hs, j in zip(hits, jobs, strict=True)
    ]


class SearchPath:
    """Searches of one app: owns the search micro-batcher."""

    def __init__(
        self,
        gallery: Gallery,
        swap: HotSwap,
        metrics: Metrics,
        bounds: BatchBounds,
        *,
        max_image_pixels: int,
        strict_image_size: bool = False,
        shadow: ShadowTraffic | None = None,
    ) -> None:
        self.gallery, self.swap, self.metrics = gallery, swap, metrics
        self.max_image_pixels, self.strict_image_size = max_image_pixels, strict_image_size
        self.shadow = shadow
        self.batcher: MicroBatcher = MicroBatcher(
            "search",
            self._run_batch,
            max_size=bounds.max_size,
            max_wait_s=bounds.max_wait_s,
            max_queue=bounds.max_queue,
            on_start=bounds.on_start,
            on_batch=metrics.batch_size.labels(queue="search").observe,
        ).start()

    def close(self) -> None:
        """Stop taking work; queued searches finish first."""
        self.batcher.close()

    def _run_batch(self, active: ActiveModel, jobs: Sequence[SearchJob]) -> list[SearchResponse]:
        answers = run_search_batch(self.gallery, active, jobs, self.metrics)
        if self.shadow is not None:  # after the answers are made; an offer never blocks
            busy = self.batcher.queued > 0
            for job, answer in zip(jobs, answers, strict=True):
                if job.filter is None:
                    self.shadow.offer(job.image, job.raw, [h.external_id for h in answer.hits], busy)
        return answers

    def arriving(self) -> AbstractContextManager[None]:
        """Around a request from its arrival to :meth:`start`: the batcher may wait for it while its body
        is read (see :mod:`service.serving.batching`)."""
        return self.batcher.announce()

    def start(self, query: Query, deadline: float) -> Awaitable[SearchResponse]:
        """Start ``query`` (an image is decoded and queued now, capturing the active model); await the
        result. Raises the domain errors of a bad query at once."""
        if isinstance(query, ImageQuery):
            active = self.swap.require_active()
            if active.card.external:
                raise NoImageModel(active.version)
            image = decode_image(
                query.raw,
                prep=active.prep,
                max_pixels=self.max_image_pixels,
                strict=self.strict_image_size,
                what="query image",
            )
            job = SearchJob(image, query.k, query.include_metadata, query.filter, raw=query.raw)
            future = self.batcher.submit(active, job, deadline=deadline)
            return result_within(future, deadline, "the search", outcome_if_late="nothing was changed")
        run: Callable[[], SearchResponse]
        if isinstance(query, VectorQuery):
            run = partial(self._by_vector, query)
        else:
            run = partial(self._by_item, query)
        return run_within(run, deadline=deadline, what="the search")

    def _respond(self, version: str, space: str, hits, include_metadata: bool) -> SearchResponse:
        meta = self.gallery.get_metadata([h.external_id for h in hits]) if (include_metadata and hits) else {}
        return SearchResponse(
            model_version=version,
            space=space,
            hits=[
                SearchHit(
                    external_id=h.external_id,
                    score=h.score,
                    embedded_by=h.embedded_by,
                    route=h.route,
                    metadata=meta.get(h.external_id) if include_metadata else None,
                )
                for h in hits
            ],
        )

    def _by_vector(self, q: VectorQuery) -> SearchResponse:
        try:
            info = self.gallery.get_version(q.model_version)
        except UnknownVersion:
            raise ModelNotFound(f"unknown model version {q.model_version[:200]!r}") from None
        active = self.swap.active
        space = active.space if active else info.space
        if info.space != space:
            raise IncompatibleModel(
                f"the vector comes from {q.model_version}, which embeds into space {info.space!r}, but the gallery "
                f"serves space {space!r}: the embeddings are not comparable (see "
                f"{backfill_report_url(q.model_version)})",
                candidate=q.model_version,
            )
        vec = np.asarray(q.vector, dtype=np.float64)[None]
        hits = self.gallery.search(space, vec, q.k, version=q.model_version, filter=q.filter)[0]
        return self._respond(q.model_version, space, hits, q.include_metadata)

    def _by_item(self, q: ItemQuery) -> SearchResponse:
        active = self.swap.require_active()
        vec, version = self.gallery.get_embedding(q.item_id, active.space)
        found = self.gallery.search(active.space, vec[None], q.k + 1, filter=q.filter)[0]
        hits = [h for h in found if h.external_id != q.item_id]
        return self._respond(version, active.space, hits[: q.k], q.include_metadata)
