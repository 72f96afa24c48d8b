"""Retrieval and classification metrics as plain functions over arrays.

Retrieval: cosine similarity on L2-normalised embeddings with full ranking of the gallery; CMC top-k (a hit
if any of the first k gallery items has the query's class) and mAP. Classification: error rate and the
negative flip rate between an old and a new classifier (DESIGN.md, "Data protocol").
"""

from __future__ import annotations

import numpy as np


def rank_gallery(queries: np.ndarray, gallery: np.ndarray, chunk: int = 512):
    """Yield (start, order) per chunk of queries: order is (q, G) gallery indices by descending cosine."""
    for s in range(0, len(queries), chunk):
        sims = queries[s : s + chunk] @ gallery.T  # (q, G)
        # Stable sort on the negated scores gives a deterministic order among exact ties.
        yield s, np.argsort(-sims, axis=1, kind="stable")


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
    hits = {k: 0 for k in ks}
    ap_sum, n = 0.0, len(queries)
    ranks = np.arange(1, len(gallery) + 1)
    for s, order in rank_gallery(queries.astype(np.float32), gallery.astype(np.float32)):
        rel = gallery_labels[order] == query_labels[s : s + len(order), None]  # (q, G) bool
        for k in ks:
            hits[k] += int(rel[:, :k].any(axis=1).sum())
        n_rel = rel.sum(axis=1)
        precision = np.cumsum(rel, axis=1) / ranks  # (q, G)
        ap = (precision * rel).sum(axis=1) / np.maximum(n_rel, 1)
        ap_sum += float(ap.sum())
    out = {f"top{k}": hits[k] / n if n else 0.0 for k in ks}
    out["mAP"] = ap_sum / n if n else 0.0
    out["n_queries"] = n
    return out


def error_rate(pred: np.ndarray, labels: np.ndarray) -> float:
    return float((pred != labels).mean()) if len(labels) else 0.0


def negative_flips(old_pred: np.ndarray, new_pred: np.ndarray, labels: np.ndarray) -> dict[str, float | list[int]]:
    """Negative flips: images the old classifier got right and the new one wrong.

    NFR = flips / N. Relative NFR = NFR / ((1 - err_old) * err_new): the flips one would expect if the two
    models erred independently are (1 - err_old) * err_new, so rel. NFR < 1 means fewer than by chance.
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
    }


def update_gain(new_old: float, old_old: float, new_new: float) -> float:
    """Share of the full upgrade's benefit obtained with no backfill: (M(n,o)-M(o,o)) / (M(n,n)-M(o,o))."""
    denom = new_new - old_old
    return (new_old - old_old) / denom if abs(denom) > 1e-12 else float("nan")
