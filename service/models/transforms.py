"""Vector transforms the service may apply: maps from an older version's space into a candidate's, fitted by
``graceful transform`` and kept in the candidate's folder (``<models dir>/<candidate>/transforms/<source>``).

A transform is valid for a (source, candidate) pair only while both folders hold the builds it was fitted on
(their weights' sha256 are in its card): a transform of another build of either model would map into the
wrong place, silently.
"""

from __future__ import annotations

import threading

from service.errors import NoTransform
from service.models.registry import ModelRegistry
from trainer import (
    ModelCard,
    TransformCard,
    TransformError,
    VectorTransform,
    list_transforms,
    load_transform,
    transform_dir,
)


class TransformStore:
    """Loads and checks the transforms of the models dir; loaded ones are cached per (candidate, source)."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self._cache: dict[tuple[str, str, str], VectorTransform] = {}
        self._lock = threading.Lock()

    def _cards(self, candidate: str, source: str) -> tuple[ModelCard, ModelCard]:
        cand = self.registry.entry(candidate).card
        src = self.registry.entry(source).card
        assert cand is not None and src is not None  # entry() raises for refused folders
        return cand, src

    def get(self, candidate: str, source: str) -> VectorTransform:
        """The transform from ``source``'s space into ``candidate``'s, checked against both models' builds.
        :class:`NoTransform` when there is none, or it was fitted on other builds, or the spaces disagree."""
        cand, src = self._cards(candidate, source)
        path = transform_dir(self.registry.entry(candidate).path, source)
        how = (
            f"fit one with `graceful transform --old <models dir>/{source} --new <models dir>/{candidate}` "
            "(a sample of images embedded by both)"
        )
        if not (path / "transform.json").exists():
            raise NoTransform(f"no transform from {source} into {candidate}: {how}")
        key = (candidate, source, str(cand.weights_sha256))
        with self._lock:
            hit = self._cache.get(key)
        if hit is None:
            try:
                hit = load_transform(path)
            except TransformError as e:
                raise NoTransform(
                    f"the transform from {source} into {candidate} is unusable: {e}; {how}"
                ) from None
        c = hit.card
        stale = [
            name
            for name, want, have in (
                (source, src.weights_sha256, c.source_sha256),
                (candidate, cand.weights_sha256, c.target_sha256),
            )
            if want and have and want != have
        ]
        if stale or c.source != source or c.target != candidate:
            raise NoTransform(
                f"the transform from {source} into {candidate} was fitted on other builds of "
                f"{', '.join(stale) or 'these models'}: {how}"
            )
        if c.source_space != src.space or c.target_space != cand.space:
            raise NoTransform(
                f"the transform maps space {c.source_space!r} into {c.target_space!r}, but {source} writes "
                f"{src.space!r} and {candidate} {cand.space!r}: {how}"
            )
        with self._lock:
            self._cache[key] = hit
        return hit

    def available(self, candidate: str) -> list[TransformCard]:
        """Cards of the transforms kept in ``candidate``'s folder (not checked against builds)."""
        return list_transforms(self.registry.entry(candidate).path)
