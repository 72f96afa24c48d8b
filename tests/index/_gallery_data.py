"""Seeded data and reference answers for the gallery tests (imported by test modules of this folder)."""

from __future__ import annotations

import numpy as np

from index import Gallery, NewItem


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def random_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    """(n, d) float32 unit rows, seeded."""
    return unit(np.random.RandomState(seed).randn(n, d))


def items(vectors: np.ndarray, prefix: str = "item", start: int = 0) -> list[NewItem]:
    return [
        NewItem(
            f"{prefix}{start + i}",
            v,
            metadata={"i": start + i},
            source_uri=f"file:///{prefix}{start + i}.png",
        )
        for i, v in enumerate(vectors)
    ]


def brute_topk(gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by cosine: (scores (n, k), row indices (n, k)), best first."""
    s = unit(queries).astype(np.float64) @ unit(gallery).astype(np.float64).T
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, idx, axis=1), idx


def answers(g: Gallery, space: str, queries: np.ndarray, k: int) -> list[list[tuple[str, float, str]]]:
    """Search answers in a comparable form (ids, rounded scores, versions)."""
    return [
        [(h.external_id, round(h.score, 5), h.embedded_by) for h in row]
        for row in g.search(space, queries, k)
    ]
