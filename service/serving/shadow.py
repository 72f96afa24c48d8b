"""Shadow traffic: a candidate also answers a fraction of live image searches, for comparison only.

Clients are answered by the active model alone. After a search batch is answered, a sampled fraction of its
queries (the decoded image, the active model's top-10) is offered to a small queue; one background thread
embeds each with the candidate, searches the candidate's space, and compares: overlap@10 with the active
answer, whether the active top-1 is lost from the candidate's top-10, and the candidate's latency. An
offer never blocks: it is dropped when the queue is full or live searches are waiting (live traffic first),
and the drops are counted. One shadow at a time.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from index import Gallery
from service.errors import BadImage, BadRequest, IncompatibleModel, NoShadow, TooLarge
from service.images import decode_image
from service.models.cache import ModelCache
from service.models.hot_swap import HotSwap
from trainer import LoadedModel, NoImageModel, embed_images

log = logging.getLogger(__name__)

TOP = 10
LATENCIES_KEPT = 2048


@dataclass
class _Session:
    version: str
    fraction: float
    loaded: LoadedModel
    started_at: float
    offered: int = 0
    compared: int = 0
    dropped: int = 0
    failed: int = 0
    overlap_sum: float = 0.0
    lost: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCIES_KEPT))


@dataclass(frozen=True)
class _Offer:
    image: np.ndarray  # (C, H, W) uint8, the active model's input
    raw: bytes | None
    active_top: list[str]
    session: _Session


class ShadowTraffic:
    """The shadow comparison of one app. Thread-safe."""

    def __init__(
        self,
        gallery: Gallery,
        swap: HotSwap,
        models: ModelCache,
        *,
        max_queue: int = 64,
        max_pixels: int = 1 << 20,
        seed: int = 0,
    ) -> None:
        self.gallery, self.swap, self.models = gallery, swap, models
        self.max_queue, self.max_pixels = max_queue, max_pixels
        self._rng = random.Random(seed)
        self._session: _Session | None = None
        self._queue: deque[_Offer] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._worker, name="shadow", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        self._thread.join(10)

    # ------------------------------------------------------------------ control
    def start(self, version: str, fraction: float) -> dict[str, Any]:
        """Shadow ``version`` on ``fraction`` (0-1] of image searches, replacing any running shadow."""
        if not 0 < fraction <= 1:
            raise BadRequest(f"fraction must be in (0, 1], got {fraction}")
        card = self.swap.registry.entry(version).card
        assert card is not None
        active = self.swap.require_active()
        if version == active.version:
            raise BadRequest(f"{version} is the active model: nothing to compare it with")
        problem = self.swap.problem(card)
        if problem:
            raise IncompatibleModel(f"{version} cannot search this gallery: {problem}", candidate=version)
        external = next((m for m in (card, active.card) if m.external), None)
        if external is not None:  # a shadow answers image searches with the candidate
            raise NoImageModel(
                external.version, "a shadow compares the answers to image searches, so it cannot run"
            )
        loaded = self.models.get(version)
        with self._cond:
            self._session = _Session(
                version=version, fraction=float(fraction), loaded=loaded, started_at=time.time()
            )
            self._queue.clear()
        log.info("shadowing %s on %.0f%% of image searches", version, 100 * fraction)
        return self.status(version)

    def stop(self, version: str) -> dict[str, Any]:
        """End the shadow of ``version``; returns its final comparison."""
        with self._cond:
            out = self.status(
                version
            )  # NoShadow unless ``version`` is the one running, checked under the lock
            self._session = None
            self._queue.clear()
        out["running"] = False
        return out

    def status(self, version: str) -> dict[str, Any]:
        s = self._session
        if s is None or s.version != version:
            raise NoShadow(
                f"no shadow of {version} is running: start one with POST /v1/models/{version}/shadow"
            )
        lat = np.asarray(list(s.latencies_ms), dtype=np.float64)
        n = max(s.compared, 1)
        return {
            "version": s.version,
            "running": True,
            "fraction": s.fraction,
            "started_at": s.started_at,
            "offered": s.offered,
            "compared": s.compared,
            "dropped": s.dropped,
            "failed": s.failed,
            "overlap_at_10": round(s.overlap_sum / n, 4) if s.compared else None,
            "lost_top1": round(s.lost / n, 4) if s.compared else None,
            "latency_ms": {
                "p50": round(float(np.percentile(lat, 50)), 2),
                "p99": round(float(np.percentile(lat, 99)), 2),
            }
            if len(lat)
            else None,
        }

    # ------------------------------------------------------------------ the live path
    def offer(self, image: np.ndarray, raw: bytes | None, active_top: list[str], busy: bool) -> None:
        """Called after a live search was answered; never blocks. ``busy``: live searches are waiting."""
        s = self._session
        if s is None or self._rng.random() >= s.fraction:
            return
        active = self.swap.active
        if active is not None and active.version == s.version:
            return  # the candidate was activated meanwhile: it answers the clients itself
        with self._cond:
            s.offered += 1
            if busy or len(self._queue) >= self.max_queue:
                s.dropped += 1  # live traffic first
                return
            self._queue.append(_Offer(image, raw, active_top[:TOP], s))
            self._cond.notify()

    # ------------------------------------------------------------------ the worker
    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                offer = self._queue.popleft()
            try:
                self._compare(offer)
            except Exception:  # a shadow must never take the service down: count it and go on
                log.exception("shadow comparison failed")
                offer.session.failed += 1

    def _compare(self, offer: _Offer) -> None:
        s = offer.session
        t0 = time.perf_counter()
        prep = s.loaded.preprocess
        image = offer.image
        if offer.raw is not None:  # the candidate sees the query through its own contract (size, resize)
            try:
                image = decode_image(offer.raw, prep=prep, max_pixels=self.max_pixels, what="shadow query")
            except (BadImage, TooLarge):
                s.failed += 1
                return
        elif image.shape != prep.shape:
            s.failed += 1
            return
        vec = embed_images(s.loaded, np.array(image[None]))  # a writable copy for torch
        hits = self.gallery.search(s.loaded.card.space, vec, TOP)[0]
        elapsed_ms = (time.perf_counter() - t0) * 1e3
        mine = [h.external_id for h in hits]
        theirs = offer.active_top
        with self._cond:
            s.compared += 1
            s.latencies_ms.append(elapsed_ms)
            if theirs:
                s.overlap_sum += len(set(mine) & set(theirs)) / min(TOP, len(theirs))
                s.lost += theirs[0] not in mine
