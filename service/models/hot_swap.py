"""Hot swap: which model serves, and switching it while queries keep flowing.

Activation loads and warms the new model *first* (through the model cache), checks it may serve over the
gallery (every stored item has an embedding in the model's space), persists it, and only then swaps one
reference: a request captures :attr:`HotSwap.active` once, so requests in flight finish on the model they
started with. Ingest writes under the swap's read lock, an activation's check-and-swap under its write
lock, so no item lands in the old space between "the gallery is compatible" and the swap.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np

from index import Gallery
from index.rwlock import RWLock
from service.errors import CheckFailed, IncompatibleModel, NoActiveModel, NothingToRollBack
from service.models.cache import ModelCache
from service.models.check import CompatibilityCheck
from service.models.registry import ModelRegistry
from trainer import LoadedModel, ModelCard, Preprocess, embed_images

log = logging.getLogger(__name__)

WARM_IMAGES = 8


@dataclass(frozen=True)
class ActiveModel:
    """An immutable snapshot of the serving model; swapping replaces the whole object."""

    version: str
    space: str
    loaded: LoadedModel
    activated_at: float

    @property
    def card(self) -> ModelCard:
        return self.loaded.card

    @property
    def prep(self) -> Preprocess:
        """The model's input contract: what images are decoded and resized to for it."""
        return self.loaded.preprocess

    def embed(self, images: np.ndarray) -> np.ndarray:
        """(N, C, H, W) uint8 -> (N, D) float32 unit-norm embeddings (for an adapter version: the new model's,
        mapped into the old space by the adapter)."""
        return embed_images(self.loaded, images)


@dataclass(frozen=True)
class ActivationResult:
    version: str
    previous: str | None
    space: str
    seconds: float
    warm_images: int = 0
    check: dict[str, Any] | None = None  # the measured check the decision rested on (None: not run)
    forced: bool = False


def backfill_report_url(candidate: str) -> str:
    return f"/v1/backfill/report?candidate={candidate}"


def space_problem(gallery: Gallery, card: ModelCard) -> str | None:
    """Why ``card``'s model may not serve over ``gallery``, or None if it may.

    It may when every stored item has an embedding in the model's space (trivially so for an empty
    gallery, or a BCT child of the gallery's model). O(1): activation must not scale with the gallery.
    """
    total, in_space = gallery.live_counts(card.space)
    if total == 0 or in_space == total:
        return None
    spaces = {s: n for s, n in gallery.counts_by_space().items() if n}
    where = ", ".join(f"{n} in space {s!r}" for s, n in sorted(spaces.items()))
    return (
        f"model {card.version} writes embeddings into space {card.space!r}, but the gallery's {total} items "
        f"are embedded in another space ({where}): its queries would be compared with incompatible "
        f"embeddings. Train it with BCT against the gallery's model, or re-embed the gallery first "
        f"(cost: {backfill_report_url(card.version)})"
    )


class HotSwap:
    """The active model and activations. Thread-safe; activations are serialised."""

    def __init__(
        self, registry: ModelRegistry, models: ModelCache, check: CompatibilityCheck | None = None
    ) -> None:
        self.registry = registry
        self.models = models
        self.check = check
        self.gallery = registry.gallery
        self._active: ActiveModel | None = None
        self._lock = threading.Lock()  # one activation at a time
        self._swap = RWLock()

    @property
    def active(self) -> ActiveModel | None:
        return self._active

    def require_active(self) -> ActiveModel:
        active = self._active
        if active is None:
            raise NoActiveModel("no model is active: activate one with POST /v1/models/{version}/activate")
        return active

    def serving(self) -> AbstractContextManager[None]:
        """Context for a request that writes embeddings with the active model (ingest)."""
        return self._swap.read()

    def serving_space(self) -> str | None:
        """The space searches use: the active model's, else the space holding most items."""
        active = self._active
        if active is not None:
            return active.space
        by_space = self.gallery.counts_by_space()
        return max(by_space, key=lambda s: by_space[s]) if by_space else None

    def problem(self, card: ModelCard) -> str | None:
        return space_problem(self.gallery, card)

    def _load_and_warm(self, version: str) -> tuple[LoadedModel, int]:
        loaded = self.models.get(version)
        if loaded.card.external:
            return loaded, 0  # it embeds no images (its vectors arrive ready): nothing to warm
        prep = loaded.preprocess
        # Warm-up: the first forward allocates buffers and picks kernels; do it before taking traffic.
        embed_images(loaded, np.zeros((WARM_IMAGES, *prep.shape), dtype=np.uint8))
        return loaded, WARM_IMAGES

    def measure(self, version: str) -> dict[str, Any]:
        """The compatibility check of ``version`` against the gallery as the active model serves it."""
        if self.check is None:
            return {
                "candidate": version,
                "method": "card",
                "passed": True,
                "reason": "the check is off",
                "detail": "GRACEFUL_CHECK_SAMPLE=0: the decision rests on the card's space",
            }
        self.registry.entry(version)  # ModelNotFound / InvalidModel first
        active = self._active
        return self.check.measure(
            version, active.loaded if active else None, active.space if active else None
        )

    def activate(self, version: str, *, rollback: bool = False, force: bool = False) -> ActivationResult:
        """Load, warm, check and swap to ``version``. Raises IncompatibleModel (another space) or CheckFailed
        (measured worse or unrelated; not with ``force``); nothing changes then. A rollback is not measured:
        its version served this gallery before."""
        t0 = time.perf_counter()
        card = self.registry.entry(version).card
        assert card is not None  # entry() raises for refused folders
        problem = self.problem(card)
        if problem:
            raise IncompatibleModel(problem, candidate=version)
        active = self._active
        check: dict[str, Any] | None = None
        if not rollback and active is not None and active.version != version:
            check = self.measure(version)
            if not check["passed"] and not force:
                raise CheckFailed(
                    f"model {version} failed the compatibility check against the gallery: {check['reason']} "
                    f"({check.get('criterion', check.get('detail', ''))}); POST /v1/models/{version}/check shows "
                    "the figures; activate with force=true (and the API key) to override",
                    candidate=version,
                    check=check,
                )
        loaded, warm = self._load_and_warm(version)
        note: dict[str, Any] = {"forced": bool(force and check is not None and not check["passed"])}
        if check is not None:
            note["check"] = {k: check.get(k) for k in ("method", "passed", "criterion", "reason")}
        with self._lock, self._swap.write():
            # Re-check under the lock: an ingest may have landed meanwhile (cheap; counts only).
            problem = self.problem(card)
            if problem:
                raise IncompatibleModel(problem, candidate=version)
            previous = self._active.version if self._active else None
            # A switch of space is re-counted in SQL at commit: other replicas' writes not followed yet
            # could hold items without an embedding in the new space.
            switch = self._active is None or self._active.space != card.space
            self.gallery.set_active_version(
                version, rollback=rollback, note=note, require_complete_space=switch
            )
            self._active = ActiveModel(
                version=version, space=card.space, loaded=loaded, activated_at=time.time()
            )
            self.models.set_active(loaded)
        seconds = time.perf_counter() - t0
        log.info(
            "activated %s (previous %s) in %.3fs%s",
            version,
            previous,
            seconds,
            " (forced past a failed check)" if note["forced"] else "",
        )
        return ActivationResult(
            version=version,
            previous=previous,
            space=card.space,
            seconds=seconds,
            warm_images=warm,
            check=check,
            forced=note["forced"],
        )

    def follow(self, version: str) -> bool:
        """Serve ``version`` because another replica activated it (the persisted active version says so).

        The activating replica ran the guard and persisted the choice; this one only loads and warms the
        model, then swaps the reference, unless the persisted version changed again meanwhile. True when
        it swapped."""
        active = self._active
        if active is not None and active.version == version:
            return False
        loaded, _ = self._load_and_warm(version)
        with self._lock, self._swap.write():
            if self.gallery.active_version() != version:
                return False  # another activation landed meanwhile: the next poll follows that one
            previous = self._active.version if self._active else None
            self._active = ActiveModel(
                version=version, space=loaded.card.space, loaded=loaded, activated_at=time.time()
            )
            self.models.set_active(loaded)
        log.info("following another replica: now serving %s (previous %s)", version, previous)
        return True

    def rollback(self) -> ActivationResult:
        """Re-activate the version active before the current one (same checks as an activation)."""
        history = self.gallery.activation_history()
        if len(history) < 2:
            raise NothingToRollBack("no earlier activation to roll back to")
        return self.activate(history[-2], rollback=True)

    def restore(self, default: str | None) -> ActivationResult | None:
        """At start-up: re-activate the persisted version, else ``default``; None if neither is set."""
        version = self.gallery.active_version() or default
        if version is None:
            return None
        return self.activate(version)
