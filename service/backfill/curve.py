"""Expected retrieval quality of a partly backfilled gallery: the curve of the backfill-cost report.

Method (``simulated``): a seeded sample of the gallery's own items whose source is kept and whose metadata
has a ``label``. Each sample item is embedded by the candidate; its stored embedding is the "old" one.
Every sample item in turn is a query (leave-one-out) against the other sample items, the gallery mixing
new embeddings (the first fraction of the policy's order, restricted to the sample) and stored ones.
- same-space candidate: queries are embedded by the candidate (it can be activated at once and serve over
  the mixed gallery);
- other-space candidate: searches stay on the current model until every item is re-embedded, so quality
  is the current one (stored/stored) below 100% and candidate/candidate at 100%.

Without enough labelled sample items the report falls back to the candidate's card (``card``): a straight
line from new/old to new/new, the same for both policies (the card cannot tell which items an order picks).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from index import Gallery
from service.backfill.order import margin_scores, order_by_scores, uncertainty_scores
from service.blobs import BlobStore
from service.errors import BadImage, TooLarge
from service.images import decode_image
from trainer import LoadedModel, embed_images, relevance_metrics

log = logging.getLogger(__name__)

FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
QUALITY_KEYS = ("top1", "top5", "mAP")
MIN_LABELLED = 50  # below this many labelled sample items, the simulation is too noisy: use the card


def mixed_gallery_quality(
    queries: np.ndarray,
    query_labels: np.ndarray,
    old: np.ndarray,
    new: np.ndarray,
    gallery_labels: np.ndarray,
    order: np.ndarray,
    fractions: Sequence[float],
    *,
    leave_one_out: bool = False,
    start: int = 0,
    chunk: int = 256,
) -> list[dict[str, float]]:
    """Quality at each fraction f: gallery item ``order[p]`` carries its ``new`` embedding when
    ``p < start + round(f * (G - start))``, else its ``old`` one (``start``: items new from the outset).

    ``queries`` (Q, D), ``old``/``new`` (G, D) unit rows, labels (Q,) / (G,). ``leave_one_out``: query i is
    gallery item i and is left out of its own ranking (Q == G). Full ranking, cosine. Returns one
    ``{"top1", "top5", "mAP"}`` per fraction.
    """
    n_q, n_g = len(queries), len(old)
    if leave_one_out and n_q != n_g:
        raise ValueError("leave_one_out needs the queries to be the gallery items (Q == G)")
    rank = np.empty(n_g, dtype=np.int64)
    rank[np.asarray(order, dtype=np.int64)] = np.arange(n_g)
    sums = [dict.fromkeys(QUALITY_KEYS, 0.0) for _ in fractions]
    for s in range(0, n_q, chunk):
        q = queries[s : s + chunk].astype(np.float32)
        ql = query_labels[s : s + chunk]
        sim_old, sim_new = q @ old.T.astype(np.float32), q @ new.T.astype(np.float32)  # (b, G) each
        rel_all = gallery_labels[None, :] == ql[:, None]  # (b, G)
        n_rel = rel_all.sum(axis=1)
        if leave_one_out:
            rows = np.arange(len(q))
            n_rel = n_rel - 1
        for j, f in enumerate(fractions):
            sims = np.where(rank[None, :] < start + round(f * (n_g - start)), sim_new, sim_old)
            if leave_one_out:
                sims[rows, s + rows] = -np.inf  # ranked last, then cut off
            ranked = np.argsort(-sims, axis=1, kind="stable")
            rel = np.take_along_axis(rel_all, ranked, axis=1)
            if leave_one_out:
                rel = rel[:, :-1]
            for key, v in relevance_metrics(rel, n_rel).items():
                if key in sums[j]:
                    sums[j][key] += v
    return [{k: v / max(n_q, 1) for k, v in s.items()} for s in sums]


@dataclass
class Sample:
    """Sample items of the gallery: stored (old) and candidate (new) embeddings, labels, policy orders."""

    item_ids: np.ndarray  # (S,)
    labels: np.ndarray  # (S,)
    old: np.ndarray  # (S, D) stored embeddings in the serving space
    new: np.ndarray  # (S, D') candidate embeddings
    orders: dict[str, np.ndarray] = field(default_factory=dict)  # policy -> positions into the sample
    done: int = 0  # the first ``done`` positions of every order are embedded by the candidate already


def simulate(sample: Sample, same_space: bool, fractions: Sequence[float] = FRACTIONS) -> dict[str, list[dict]]:
    """Per policy, the expected quality at each fraction (see the module docstring)."""
    out: dict[str, list[dict]] = {}
    if not same_space:
        current = mixed_gallery_quality(sample.old, sample.labels, sample.old, sample.old, sample.labels,
                                         np.arange(len(sample.old)), [0.0], leave_one_out=True)[0]
        full = mixed_gallery_quality(sample.new, sample.labels, sample.new, sample.new, sample.labels,
                                     np.arange(len(sample.new)), [1.0], leave_one_out=True)[0]
        for policy in sample.orders:
            out[policy] = [full if f >= 1.0 else current for f in fractions]
        return out
    for policy, order in sample.orders.items():
        out[policy] = mixed_gallery_quality(sample.new, sample.labels, sample.old, sample.new, sample.labels,
                                            order, fractions, leave_one_out=True, start=sample.done)
    return out


def card_line(no_backfill: dict[str, float] | None, full: dict[str, float] | None, same_space: bool,
              current: dict[str, float] | None, fractions: Sequence[float] = FRACTIONS) -> list[dict] | None:
    """The card's estimate: linear from new/old (or, for another space, the current quality) to new/new."""
    start = no_backfill if same_space else current
    if not start or not full:
        return None
    keys = [k for k in QUALITY_KEYS if k in start and k in full]
    if not same_space:
        return [{k: (full[k] if f >= 1.0 else start[k]) for k in keys} for f in fractions]
    return [{k: start[k] + f * (full[k] - start[k]) for k in keys} for f in fractions]


def label_of(metadata: Any) -> int | None:
    """The integer ``label`` of an item's metadata, or None."""
    if isinstance(metadata, dict):
        v = metadata.get("label")
        if isinstance(v, bool):
            return None
        if isinstance(v, int):
            return v
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            return int(v)
    return None


def first_fraction_reaching(curve: Sequence[dict], fractions: Sequence[float], share: float = 0.9,
                            key: str = "mAP") -> float | None:
    """The first fraction whose ``key`` has ``share`` of the full backfill's gain (last point) over the
    first point; None if there is no gain to share."""
    start, end = curve[0].get(key), curve[-1].get(key)
    if start is None or end is None or end <= start:
        return None
    for f, q in zip(fractions, curve, strict=True):
        if q[key] - start >= share * (end - start) - 1e-12:
            return float(f)
    return float(fractions[-1])


def sample_gallery(
    gallery: Gallery,
    blobs: BlobStore,
    candidate: LoadedModel,
    space: str,
    size: int,
    model_of: Callable[[str], LoadedModel | None],
    *,
    max_pixels: int = 1 << 20,
    seed: int = 0,
) -> tuple[Sample | None, dict[str, int]]:
    """A seeded sample of up to ``size`` items with a kept source, a ``label`` and an embedding in ``space``,
    embedded by ``candidate``, with both policies' orders. Returns ``(sample or None, counts)``."""
    usable = [i for i, _, uri in gallery.item_sources() if uri is not None and blobs.exists(uri)]
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(np.asarray(usable, dtype=np.int64), size=min(size, len(usable)), replace=False)) \
        if usable and size > 0 else np.empty(0, np.int64)
    records = gallery.items_by_id(picked.tolist())
    labelled = [(i, label_of(records[i][2])) for i in picked.tolist() if i in records]
    labelled = [(i, lab) for i, lab in labelled if lab is not None]
    counts = {"with_source": len(usable), "sampled": int(len(picked)), "labelled": len(labelled)}
    if len(labelled) < MIN_LABELLED:
        return None, counts
    ids, versions, old = gallery.embeddings_of([i for i, _ in labelled], space)
    label_by_id = dict(labelled)
    prep = candidate.preprocess
    keep, images = [], []
    for row, iid in enumerate(ids.tolist()):
        raw = blobs.get(records[iid][1] or "")
        if raw is None:
            continue
        try:
            images.append(decode_image(raw, channels=prep.channels, size=prep.size, max_pixels=max_pixels,
                                       what=f"item {records[iid][0]!r}"))
            keep.append(row)
        except (BadImage, TooLarge):
            continue
    counts["simulated"] = len(keep)
    if len(keep) < MIN_LABELLED:
        return None, counts
    ids, old = ids[keep], old[keep]
    versions = [versions[r] for r in keep]
    new = embed_images(candidate, np.stack(images))  # (S, D')
    labels = np.asarray([label_by_id[i] for i in ids.tolist()], dtype=np.int64)
    is_done = np.asarray([v == candidate.version for v in versions])
    # the runner's scores (service.backfill.order.uncertainty_order), on the sample
    scores = margin_scores(candidate, old) if candidate.card.space == space else uncertainty_scores(
        versions, old, model_of)
    todo = np.flatnonzero(~is_done)
    done_first = np.flatnonzero(is_done)
    orders = {
        "sequential": np.concatenate([done_first, todo[np.argsort(ids[todo], kind="stable")]]),
        "uncertainty": np.concatenate([done_first, todo[order_by_scores(ids[todo], scores[todo])]]),
    }
    return Sample(item_ids=ids, labels=labels, old=old, new=new, orders=orders, done=len(done_first)), counts


class CurveCache:
    """Simulations are seconds of work (embedding the sample): keep the last per (candidate, gallery state)."""

    def __init__(self, size: int = 8) -> None:
        self._lock = threading.Lock()
        self._data: dict[tuple, Any] = {}
        self.size = size

    def get_or_compute(self, key: tuple, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._data:
                return self._data[key]
        value = compute()
        with self._lock:
            if len(self._data) >= self.size:
                self._data.pop(next(iter(self._data)))
            self._data[key] = value
        return value
