"""Plain value types exchanged with the gallery."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

import numpy as np

# How a stored vector was produced (``embeddings.route``): the version embedded the item's source, or a
# learned transform mapped the item's stored vector of another space into the version's space.
ROUTE_MODEL = "model"
ROUTE_TRANSFORM = "transform"
ROUTES = (ROUTE_MODEL, ROUTE_TRANSFORM)
# In memory (and in index snapshots) a vector's tag is its version, with "+transform" for a transformed one:
# '+' never occurs in a version name, and one interned string per (version, route) costs nothing per row.
ROUTE_SEP = "+"


def route_label(version: str, route: str) -> str:
    """The in-memory tag of a vector embedded by ``version`` through ``route``."""
    return version if route == ROUTE_MODEL else f"{version}{ROUTE_SEP}{route}"


@lru_cache(maxsize=4096)
def split_label(label: str) -> tuple[str, str]:
    """``(version, route)`` of an in-memory tag (:func:`route_label`)."""
    version, sep, route = label.partition(ROUTE_SEP)
    return version, (route if sep else ROUTE_MODEL)


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """A model version as the gallery knows it.

    ``space`` is the embedding space the version writes into; ``compatible_with`` the version whose head it
    was trained against (or None). ``card`` is the model card (JSON-serialisable). ``status`` is one of
    ``registered`` / ``active`` / ``retired`` and is managed by the gallery (ignored on registration).
    """

    version: str
    space: str
    embedding_dim: int
    compatible_with: str | None = None
    card: dict[str, Any] = field(default_factory=dict)
    status: str = "registered"
    created_at: datetime | None = None

    def same_definition(self, other: VersionInfo) -> bool:
        """True when both describe the same model (status and timestamps aside)."""
        return (self.version, self.space, self.embedding_dim, self.compatible_with, self.card) == (
            other.version,
            other.space,
            other.embedding_dim,
            other.compatible_with,
            other.card,
        )


@dataclass(frozen=True, slots=True)
class NewItem:
    """An item to store: ``vector`` is one embedding, shape (d,), any float dtype (normalised on input)."""

    external_id: str
    vector: np.ndarray
    metadata: Any = None
    source_uri: str | None = None


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result. ``score`` is the cosine similarity (inner product of unit vectors), in [-1, 1];
    ``route`` how its vector was produced (``model`` or ``transform``, see :data:`ROUTES`)."""

    external_id: str
    score: float
    embedded_by: str
    item_id: int
    route: str = ROUTE_MODEL

    @classmethod
    def of(cls, entry: tuple[int, str, str], score: float) -> Hit:
        """The hit of an in-memory entry ``(item_id, external_id, tag)``."""
        version, route = split_label(entry[2])
        return cls(entry[1], score, version, entry[0], route)
