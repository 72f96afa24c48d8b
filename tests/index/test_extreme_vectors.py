"""Finite vectors of any magnitude have a direction: they are normalised, never turned into zeros or NaN.

Components around 1e155 and beyond overflowed the float64 L2 norm (inf), so such a query became the zero
vector and returned arbitrary hits at score 0.0 (and such a stored vector could never be found)."""

from __future__ import annotations

import numpy as np
import pytest

from index import Gallery, InvalidEmbedding, NewItem
from tests.index._gallery_data import brute_topk, items, random_vectors

X = random_vectors(50, 16, seed=71)


@pytest.mark.parametrize("scale", [1e200, 1e155, 1e-300, 1e-40])
def test_scaled_query_finds_its_item_with_score_one(gallery: Gallery, scale: float) -> None:
    gallery.add(items(X), "v1")
    queries = X.astype(np.float64) * scale
    _, want = brute_topk(X, X, 1)
    hits = gallery.search("v1", queries, 3)
    assert [row[0].external_id for row in hits] == [f"item{i}" for i in want[:, 0]]
    assert [row[0].score for row in hits] == pytest.approx([1.0] * len(X), abs=1e-5)


def test_float32_near_its_limit_is_normalised(gallery: Gallery) -> None:
    """Squares of float32 components around 1e20 overflow float32: the careful path takes over."""
    gallery.add(items(X), "v1")
    (row,) = gallery.search("v1", (X[7] * np.float32(1e30))[None, :], 1)
    assert row[0].external_id == "item7" and row[0].score == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("scale", [1e200, 1e-300])
def test_scaled_stored_vector_is_stored_as_its_direction(gallery: Gallery, scale: float) -> None:
    gallery.add([NewItem("big", X[3].astype(np.float64) * scale)], "v1")
    gallery.add(items(X[4:]), "v1")
    vec, _ = gallery.get_embedding("big", "v1")
    np.testing.assert_allclose(vec, X[3], atol=1e-6)
    (row,) = gallery.search("v1", X[3], 1)
    assert row[0].external_id == "big" and row[0].score == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("vector", "message"),
    [
        (np.zeros(16), "zero norm"),
        (np.r_[1e308, np.inf, np.zeros(14)], "NaN or inf"),
        (np.full(16, np.nan), "NaN or inf"),
    ],
)
def test_zero_and_non_finite_are_still_refused(gallery: Gallery, vector: np.ndarray, message: str) -> None:
    with pytest.raises(InvalidEmbedding, match=message):
        gallery.search("v1", vector, 1)
    with pytest.raises(InvalidEmbedding, match=message):
        gallery.add([NewItem("x", vector)], "v1")
    assert gallery.count() == 0
