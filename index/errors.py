"""Typed errors of the gallery.

Every error raised for bad input is raised *before* anything is changed (or inside a transaction that is
rolled back), so a caller that catches one can rely on the gallery being exactly as it was. Messages name
the offending value and what was expected, so they can be shown to an API client as they are.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "DimensionMismatch",
    "DuplicateIds",
    "GalleryClosed",
    "GalleryError",
    "InvalidEmbedding",
    "InvalidInput",
    "ItemNotFound",
    "SpaceMismatch",
    "UnknownBackfillJob",
    "UnknownSpace",
    "UnknownVersion",
    "VersionConflict",
]


def _preview(ids: Iterable[str], limit: int = 5) -> str:
    """A short, quoted list of ids for messages: ``'a', 'b', ... (12 in all)``."""
    ids = list(ids)
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown if len(ids) <= limit else f"{shown}, ... ({len(ids)} in all)"


class GalleryError(Exception):
    """Base class of every error the gallery raises on purpose."""


class GalleryClosed(GalleryError):
    """The gallery was used after :meth:`Gallery.close`."""


class InvalidInput(GalleryError, ValueError):
    """Bad input: a malformed external id, metadata that is not JSON, ``k < 1``, a bad space name..."""


class InvalidEmbedding(InvalidInput):
    """An embedding that cannot be stored or searched: not floating point, NaN/inf, zero norm, bad shape."""


class DimensionMismatch(InvalidEmbedding):
    """An embedding whose length differs from its space's dimension."""

    def __init__(self, got: int, space: str, expected: int, what: str = "embedding") -> None:
        super().__init__(f"{what} dim {got} does not match space {space!r} (dim {expected})")
        self.got, self.space, self.expected = got, space, expected


class DuplicateIds(InvalidInput):
    """External ids that repeat inside one batch, or that already exist when adding."""

    def __init__(self, ids: Iterable[str], where: str) -> None:
        self.ids = sorted(set(ids))
        super().__init__(f"duplicate external ids {where}: {_preview(self.ids)}")


class RepeatedIds(DuplicateIds):
    """External ids that repeat inside one batch (the request contradicts itself)."""

    def __init__(self, ids: Iterable[str]) -> None:
        super().__init__(ids, "inside one batch")


class UnknownSpace(GalleryError, LookupError):
    """A space that no registered model version writes into."""

    def __init__(self, space: str, known: Iterable[str] = ()) -> None:
        known = sorted(known)
        super().__init__(
            f"unknown embedding space {space!r} (known: {', '.join(map(repr, known)) or 'none'})"
        )
        self.space = space


class UnknownVersion(GalleryError, LookupError):
    """A model version that is not registered."""

    def __init__(self, version: str) -> None:
        super().__init__(f"unknown model version {version!r}: register it first")
        self.version = version


class ItemNotFound(GalleryError, LookupError):
    """External ids that do not exist (delete, re-embed, get_embedding)."""

    def __init__(self, ids: Iterable[str], detail: str = "") -> None:
        self.ids = sorted(set(ids))
        super().__init__(f"unknown external ids{detail}: {_preview(self.ids)}")


class SpaceMismatch(GalleryError):
    """An embedding from a version whose space differs from the space it is used against."""

    def __init__(self, version: str, version_space: str, space: str) -> None:
        super().__init__(
            f"version {version!r} embeds into space {version_space!r}, not {space!r}: "
            "its embeddings are not comparable with that index"
        )
        self.version, self.version_space, self.space = version, version_space, space


class VersionConflict(GalleryError):
    """A version registered twice with different attributes, or used in a state that forbids it."""


class LeaseLost(VersionConflict):
    """A backfill write fenced by a job lease that this runner no longer holds: nothing was written."""


class ActiveSpaceChanged(VersionConflict):
    """An ingest embedded with one model found another space active at commit (another replica activated
    it): nothing was written; sending the items again embeds them with the active model."""


class UnknownBackfillJob(InvalidInput, LookupError):
    """A backfill job id that does not exist."""

    def __init__(self, job_id: object) -> None:
        super().__init__(f"unknown backfill job {job_id!r}")
        self.job_id = job_id
