from __future__ import annotations

import numpy as np

from trainer.metrics import negative_flips, retrieval_metrics, update_gain


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
