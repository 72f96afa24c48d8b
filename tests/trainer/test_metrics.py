from __future__ import annotations

import numpy as np
import pytest

from trainer.metrics import (
    negative_flips,
    retrieval_flips,
    retrieval_metrics,
    top1_hits,
    update_gain,
)


def _brute(q, ql, g, gl, k):
    """Loop-by-loop reference: CMC top-k and average precision over the full ranking."""
    hits, aps = 0, []
    for i in range(len(q)):
        sims = [float(np.dot(q[i], g[j])) for j in range(len(g))]
        order = sorted(range(len(g)), key=lambda j: (-sims[j], j))
        rel = [gl[j] == ql[i] for j in order]
        hits += any(rel[:k])
        found, precisions = 0, []
        for rank, r in enumerate(rel, start=1):
            if r:
                found += 1
                precisions.append(found / rank)
        aps.append(sum(precisions) / max(1, sum(rel)))
    return hits / len(q), float(np.mean(aps))


def test_retrieval_metrics_match_brute_force():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(23, 8)).astype(np.float32)
    g = rng.normal(size=(57, 8)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    ql, gl = rng.integers(0, 4, 23), rng.integers(0, 4, 57)
    m = retrieval_metrics(q, ql, g, gl, ks=(1, 5))
    for k in (1, 5):
        top, ap = _brute(q, ql, g, gl, k)
        assert abs(m[f"top{k}"] - top) < 1e-9
        assert abs(m["mAP"] - ap) < 1e-6


def test_perfect_and_toy_ranking():
    g = np.eye(4, dtype=np.float32)
    gl = np.array([0, 0, 1, 1])
    # Order by cosine: item 2 (class 1), item 0, item 1 (class 0), item 3: relevant at ranks 2 and 3.
    q = np.array([[0.6, 0.1, 0.8, 0.0]], dtype=np.float32)
    m = retrieval_metrics(q, np.array([0]), g, gl)
    assert m["top1"] == 0.0 and m["top5"] == 1.0
    assert abs(m["mAP"] - (1 / 2 + 2 / 3) / 2) < 1e-9


def test_negative_flips():
    labels = np.array([0, 1, 2, 3, 4])
    old = np.array([0, 1, 2, 0, 0])  # right on 0, 1, 2
    new = np.array([0, 9, 2, 3, 0])  # right on 0, 2, 3
    f = negative_flips(old, new, labels)
    assert f["flipped"] == [1] and f["nfr"] == 0.2
    assert abs(f["rel_nfr"] - 0.2 / ((1 - 0.4) * 0.4)) < 1e-12
    assert update_gain(0.6, 0.5, 0.7) == 0.5


def test_retrieval_flips_on_a_hand_computed_example():
    # Gallery: 4 unit vectors, classes 0, 0, 1, 1. Three queries (classes 0, 1, 1) under two settings.
    g = np.eye(4, dtype=np.float32)
    gl = np.array([0, 0, 1, 1])
    ql = np.array([0, 1, 1])
    old_q = np.array([[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]], dtype=np.float32)  # nearest: 0, 0, 2
    new_q = np.array([[0, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float32)  # nearest: 3, 2, 3
    old_hits, new_hits = top1_hits(old_q, ql, g, gl), top1_hits(new_q, ql, g, gl)
    assert old_hits.tolist() == [True, False, True] and new_hits.tolist() == [False, True, True]
    f = retrieval_flips(old_hits, new_hits)
    # query 0 was right and is wrong (negative flip), query 1 the reverse, query 2 right in both
    assert f["flipped_negative"] == [0] and f["flipped_positive"] == [1]
    assert f["n_negative"] == 1 and f["n_positive"] == 1 and f["n"] == 3
    assert f["nfr"] == pytest.approx(1 / 3) and f["pfr"] == pytest.approx(1 / 3)
    assert f["top1_old"] == pytest.approx(2 / 3) and f["top1_new"] == pytest.approx(2 / 3)
    assert f["rel_nfr"] == pytest.approx((1 / 3) / ((2 / 3) * (1 / 3)))
    named = retrieval_flips(old_hits, new_hits, ids=np.array([10, 15, 20]))
    assert named["flipped_negative"] == [10] and named["flipped_positive"] == [15]
    assert isinstance(named["flipped_negative"][0], int)  # plain ints: the JSON report takes them
    same = retrieval_flips(old_hits, old_hits)
    assert same["nfr"] == same["pfr"] == 0.0 and same["flipped_negative"] == []
    with pytest.raises(ValueError):
        retrieval_flips(old_hits, new_hits[:2])


def test_top1_hits_agree_with_the_ranking_metrics_and_break_ties_alike():
    rng = np.random.default_rng(3)
    q = rng.normal(size=(31, 6)).astype(np.float32)
    g = rng.normal(size=(40, 6)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    ql, gl = rng.integers(0, 3, 31), rng.integers(0, 3, 40)
    hits = top1_hits(q, ql, g, gl, chunk=7)
    assert hits.mean() == pytest.approx(retrieval_metrics(q, ql, g, gl)["top1"])
    # an exact tie: the first gallery item wins, as in the stable ranking
    tied = top1_hits(
        np.array([[1.0, 0.0]]), np.array([1]), np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([1, 0])
    )
    assert tied.tolist() == [True]
