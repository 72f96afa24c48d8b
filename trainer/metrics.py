"""Retrieval and classification metrics as plain functions over arrays.

Retrieval: cosine similarity on L2-normalised embeddings with full ranking of the gallery; CMC top-k (a hit
if any of the first k gallery items has the query's class) and mAP. Classification: error rate and the
negative flip rate between an old and a new classifier; retrieval flips (a query's top-1 right under one
setting, wrong under another) between an old and a new query/gallery setting (docs/architecture.md and the
README: the retrieval protocol).
"""

from __future__ import annotations

from typing import Any

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


def top1_hits(
    queries: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    chunk: int = 512,
) -> np.ndarray:
    """(Q,) bool: whether each of the (Q, D) queries' nearest (G, D) gallery item (cosine, unit rows) has the
    query's class. Ties go to the lowest gallery index, as in :func:`rank_gallery`'s stable order."""
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"query dim {queries.shape[1]} != gallery dim {gallery.shape[1]}")
    if len(gallery) == 0:
        return np.zeros(len(queries), dtype=bool)
    q, g = queries.astype(np.float32), gallery.astype(np.float32)
    out = np.empty(len(queries), dtype=bool)
    for s in range(0, len(q), chunk):
        first = np.argmax(q[s : s + chunk] @ g.T, axis=1)  # (q,): argmax keeps the first of equal maxima
        out[s : s + chunk] = gallery_labels[first] == query_labels[s : s + chunk]
    return out


def retrieval_flips(
    old_hits: np.ndarray, new_hits: np.ndarray, ids: np.ndarray | list[Any] | None = None
) -> dict[str, Any]:
    """Retrieval flips between an old setting (say old queries on the old gallery) and a new one (new queries
    on the old gallery, or on a re-embedded one), from each query's top-1 hit under both: (Q,) bool each.

    NFR: share of queries whose top-1 had the query's class under the old setting and not under the new one;
    PFR: the reverse. Relative NFR = NFR / (top1_old * (1 - top1_new)), the flips expected by chance.
    ``flipped_negative`` / ``flipped_positive`` name the flipped queries: their positions, or ``ids[pos]``.
    """
    old_ok, new_ok = np.asarray(old_hits, dtype=bool), np.asarray(new_hits, dtype=bool)
    if old_ok.shape != new_ok.shape or old_ok.ndim != 1:
        raise ValueError(f"top-1 hits must be two (Q,) arrays, got {old_ok.shape} and {new_ok.shape}")
    if ids is not None and len(ids) != len(old_ok):
        raise ValueError(f"{len(ids)} ids for {len(old_ok)} queries")
    neg, pos = np.flatnonzero(old_ok & ~new_ok), np.flatnonzero(~old_ok & new_ok)
    n = len(old_ok)
    top1_old = float(old_ok.mean()) if n else 0.0
    top1_new = float(new_ok.mean()) if n else 0.0
    nfr = len(neg) / n if n else 0.0
    chance = top1_old * (1.0 - top1_new)

    def named(where: np.ndarray) -> list[Any]:
        if ids is None:
            return where.tolist()
        return [v.item() if isinstance(v, np.generic) else v for v in np.asarray(ids, dtype=object)[where]]

    return {
        "top1_old": top1_old,
        "top1_new": top1_new,
        "nfr": nfr,
        "pfr": len(pos) / n if n else 0.0,
        "rel_nfr": nfr / chance if chance > 0 else 0.0,
        "n_negative": len(neg),
        "n_positive": len(pos),
        "n": n,
        "flipped_negative": named(neg),
        "flipped_positive": named(pos),
    }


def update_gain(new_old: float, old_old: float, new_new: float) -> float:
    """Share of the full upgrade's benefit obtained with no backfill: (M(n,o)-M(o,o)) / (M(n,n)-M(o,o))."""
    denom = new_new - old_old
    return (new_old - old_old) / denom if abs(denom) > 1e-12 else float("nan")
