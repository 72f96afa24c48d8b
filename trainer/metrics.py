"""Retrieval and classification metrics as plain functions over arrays.

Retrieval: cosine similarity on L2-normalised embeddings with full ranking of the gallery; CMC top-k (a hit
if any of the first k gallery items has the query's class) and mAP. Classification: error rate and the
negative flip rate between an old and a new classifier (docs/architecture.md and the README: the retrieval protocol).
"""

from __future__ import annotations

import numpy as np


def rank_gallery(queries: np.ndarray, gallery: np.ndarray, chunk: int = 512):
    """Yield (start, order) per chunk of queries: order is (q, G) gallery indices by descending cosine."""
    for s in range(0, len(queries), chunk):
        sims = queries[s : s + chunk] @ gallery.T  # (q, G)
        # Stable sort on the negated scores gives a deterministic order among exact ties.
        yield s, np.argsort(-sims, axis=1, kind="stable")


def relevance_metrics(
    rel: np.ndarray, n_relevant: np.ndarray, ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """Sums (not means) of CMC top-k hits and AP over queries, from ranked relevance.

    ``rel`` is (q, R) bool: whether the r-th ranked gallery item has the query's class; ``n_relevant`` (q,)
    how many gallery items have it in all (a ranking truncated at R < G counts the rest as never found).
    """
    out = {f"top{k}": float(rel[:, :k].any(axis=1).sum()) for k in ks}
    precision = np.cumsum(rel, axis=1) / np.arange(1, rel.shape[1] + 1)  # (q, R)
    out["mAP"] = float(((precision * rel).sum(axis=1) / np.maximum(n_relevant, 1)).sum())
    return out


def retrieval_metrics(
    queries: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    ks: tuple[int, ...] = (1, 5),
) -> dict[str, float]:
    """{"top1", "top5", "mAP", "n_queries"} for (Q, D) queries against a (G, D) gallery, both unit-norm."""
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"query dim {queries.shape[1]} != gallery dim {gallery.shape[1]}")
    sums: dict[str, float] = {}
    n = len(queries)
    for s, order in rank_gallery(queries.astype(np.float32), gallery.astype(np.float32)):
        ql = query_labels[s : s + len(order)]
        rel = gallery_labels[order] == ql[:, None]  # (q, G) bool
        for key, v in relevance_metrics(rel, rel.sum(axis=1), ks).items():
            sums[key] = sums.get(key, 0.0) + v
    out: dict[str, float] = (
        {key: v / n if n else 0.0 for key, v in sums.items()}
        if n
        else {**{f"top{k}": 0.0 for k in ks}, "mAP": 0.0}
    )
    out["n_queries"] = n
    return out


def error_rate(pred: np.ndarray, labels: np.ndarray) -> float:
    return float((pred != labels).mean()) if len(labels) else 0.0


def negative_flips(
    old_pred: np.ndarray, new_pred: np.ndarray, labels: np.ndarray
) -> dict[str, float | list[int]]:
    """Negative flips: images the old classifier got right and the new one wrong.

    NFR = flips / N. Relative NFR = NFR / ((1 - err_old) * err_new): the flips one would expect if the two
    models erred independently are (1 - err_old) * err_new, so rel. NFR < 1 means fewer than by chance.
    The ``flipped*`` lists name every flipped example: its index, true label, and the new (wrong) prediction
    (the old prediction is the true label by definition).
    """
    old_ok, new_ok = old_pred == labels, new_pred == labels
    flips = np.flatnonzero(old_ok & ~new_ok)
    n = len(labels)
    err_old, err_new = 1.0 - float(old_ok.mean()), 1.0 - float(new_ok.mean())
    nfr = len(flips) / n if n else 0.0
    chance = (1.0 - err_old) * err_new
    return {
        "err_old": err_old,
        "err_new": err_new,
        "nfr": nfr,
        "rel_nfr": nfr / chance if chance > 0 else 0.0,
        "n_flips": len(flips),
        "n": n,
        "flipped": flips.tolist(),
        "flipped_label": labels[flips].tolist(),
        "flipped_new_pred": new_pred[flips].tolist(),
    }


def update_gain(new_old: float, old_old: float, new_new: float) -> float:
    """Share of the full upgrade's benefit obtained with no backfill: (M(n,o)-M(o,o)) / (M(n,n)-M(o,o))."""
    denom = new_new - old_old
    return (new_old - old_old) / denom if abs(denom) > 1e-12 else float("nan")
