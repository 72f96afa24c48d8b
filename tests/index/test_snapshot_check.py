"""The sampled comparison of a loaded index with the stored vectors: no false alarm for any index type
(exact, lossy codes, IVF that cannot reconstruct by id), and another item's vector is always caught."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from index import snapshot_check as check
from index.space_index import make_faiss_index
from tests.index._gallery_data import random_vectors

X = random_vectors(400, 16, seed=61)
IDS = np.arange(400, dtype=np.int64) * 7 + 3  # vec_ids are not positions
SAMPLE = np.random.default_rng(0).choice(400, 64, replace=False)


def _index(factory: str) -> faiss.IndexIDMap2:
    index = make_faiss_index(factory, 16)
    if not index.is_trained:
        index.train(X)
    index.add_with_ids(X, IDS)
    return index


FACTORIES = ["Flat", "HNSW16", "HNSW16_SQ8", "SQ8", "PQ4x4", "IVF4,Flat", "IVF4,PQ4x4", "IVF4,SQ8"]


@pytest.mark.parametrize("factory", FACTORIES)
def test_stored_vectors_pass_and_other_vectors_fail(factory: str) -> None:
    index = _index(factory)
    assert check._vectors_mismatch(index, IDS[SAMPLE], X[SAMPLE]) is None
    shifted = X[(SAMPLE + 1) % 400]  # each id checked against its neighbour's vector
    assert "differ from SQL" in (check._vectors_mismatch(index, IDS[SAMPLE], shifted) or "")


@pytest.mark.parametrize("factory", ["IVF4,Flat", "IVF4,PQ4x4"])
def test_ivf_is_reconstructed_from_its_lists(factory: str) -> None:
    """IVF cannot reconstruct by id without a direct map: the check reads its inverted lists instead."""
    index = _index(factory)
    with pytest.raises(RuntimeError):
        index.reconstruct(int(IDS[0]))
    got = check._reconstruct(index, IDS[SAMPLE], X[SAMPLE])
    assert got is not None
    if factory == "IVF4,Flat":
        np.testing.assert_array_equal(got, X[SAMPLE])


def test_search_fallback_finds_itself_or_reports() -> None:
    index = _index("IVF4,Flat")
    faiss.extract_index_ivf(index).nprobe = 4
    assert check._search_mismatch(index, IDS[SAMPLE], X[SAMPLE]) is None
    assert "do not find themselves" in (check._search_mismatch(index, IDS[SAMPLE], -X[SAMPLE]) or "")
