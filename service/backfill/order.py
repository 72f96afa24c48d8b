"""The order in which a backfill re-embeds the gallery.

- ``sequential``: by item id (ingest order).
- ``uncertainty``: the items whose stored embedding is least confidently classified go first; the score is
  the softmax margin ``p(top1) - p(top2)`` of a classifier head applied to the stored embedding (low =
  uncertain). Which head: for a candidate of the same space (a BCT child) the candidate's own head, which
  is defined on that space and knows the classes the old model never saw; otherwise (another space: its
  head cannot read the stored embeddings) the head of the version that made each embedding. Measured on
  Fashion-MNIST (BENCHMARKS.md, "Backfill"): with the old head the order buys no more than sequential on
  mAP, because it cannot tell the new classes apart; with the candidate's head the first fractions buy
  most of the gain. Items whose model cannot be loaded keep their id order, after the scored ones.

Computing the order reads every stored embedding of the serving space once (one SQL pass; ~50 MB at 1e5
items of dim 128) and classifies it in chunks; the order is then stored in SQL by the runner.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from index import Gallery
from trainer import LoadedModel

log = logging.getLogger(__name__)

POLICIES = ("sequential", "uncertainty")


def margin_scores(loaded: LoadedModel, vectors: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """(n, d) stored unit embeddings -> (n,) softmax margin under ``loaded``'s head, in [0, 1]; low = uncertain.

    A one-class head has no margin: its cosine to that class stands in (low = far from the class centre).
    """
    out = np.empty(len(vectors), dtype=np.float64)
    with torch.inference_mode():
        for s in range(0, len(vectors), chunk):
            logits = loaded.model.classify(
                torch.from_numpy(np.ascontiguousarray(vectors[s : s + chunk]))
            )  # (b, K)
            if logits.shape[1] < 2:
                out[s : s + len(logits)] = (logits[:, 0] / loaded.model.head.scale).double().numpy()
                continue
            top2 = torch.softmax(logits.double(), dim=1).topk(2, dim=1).values  # (b, 2)
            out[s : s + len(logits)] = (top2[:, 0] - top2[:, 1]).numpy()
    return out


def uncertainty_scores(
    versions: list[str], vectors: np.ndarray, model_of: Callable[[str], LoadedModel | None]
) -> np.ndarray:
    """(n,) margins of stored embeddings (``vectors`` (n, d), made by ``versions[i]``) under each one's own
    model's head; NaN where that model cannot be loaded."""
    scores = np.full(len(versions), np.nan)
    ver = np.asarray(versions, dtype=object)
    for v in sorted(set(versions)):
        loaded = model_of(v)
        if loaded is None or loaded.card.external:  # an external version has no head to score with
            log.warning(
                "no model with a head for version %s (missing, refused or external): its items keep id order "
                "in the uncertainty policy",
                v,
            )
            continue
        rows = np.flatnonzero(ver == v)
        scores[rows] = margin_scores(loaded, vectors[rows])
    return scores


def order_by_scores(item_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Positions of ``item_ids`` (n,) from lowest score to highest; ties and NaN scores (last) by item id."""
    key = np.where(np.isnan(scores), np.inf, scores)
    return np.lexsort((item_ids, key))


@dataclass
class Order:
    """An item order: ``item_ids[p]`` goes p-th; ``scores`` is the policy's priority (lower first)."""

    item_ids: np.ndarray  # (n,) int64
    scores: np.ndarray  # (n,) float64, NaN where unknown
    seconds: float
    unscored: int


def uncertainty_order(
    gallery: Gallery,
    space: str,
    model_of: Callable[[str], LoadedModel | None],
    candidate: LoadedModel | None = None,
) -> Order:
    """The uncertainty-first order of every item with an embedding in ``space`` (the serving space), scored
    by ``candidate``'s head when it writes into ``space``, else by each embedding's own model's head."""
    t0 = time.perf_counter()
    item_ids, versions, vectors = gallery.space_embeddings(space)
    if candidate is not None and candidate.card.space == space:
        scores = margin_scores(candidate, vectors)
    else:
        scores = uncertainty_scores(versions, vectors, model_of)
    perm = order_by_scores(item_ids, scores)
    return Order(
        item_ids=item_ids[perm],
        scores=scores[perm],
        seconds=time.perf_counter() - t0,
        unscored=int(np.isnan(scores).sum()),
    )
