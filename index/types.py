"""Plain value types exchanged with the gallery."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np


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
    """One search result. ``score`` is the cosine similarity (inner product of unit vectors), in [-1, 1]."""

    external_id: str
    score: float
    embedded_by: str
    item_id: int
