"""Expected retrieval quality of a partly backfilled gallery: the curve of the backfill-cost report.

Method (``simulated``): the gallery's labelled items (a seeded subsample of ``max_gallery`` above that),
each embedded by the candidate from its kept source (an item without one keeps its stored embedding, as
a backfill would skip it); its stored embedding is the "old" one. A seeded sample of them are the queries,
each against the *whole* gallery but itself, the gallery mixing new embeddings (the first fraction of the
policy's order) and stored ones. Ranking against the whole gallery matters: a curve over a sample-sized
gallery ran 0.04-0.05 mAP above what the service then measured.
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
from service.labels import label_of
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
    exclude: np.ndarray | None = None,
    start: int = 0,
    chunk: int = 256,
) -> list[dict[str, float]]:
    """Quality at each fraction f: gallery item ``order[p]`` carries its ``new`` embedding when
    ``p < start + round(f * (G - start))``, else its ``old`` one (``start``: items new from the outset).

    ``queries`` (Q, D), ``old``/``new`` (G, D) unit rows, labels (Q,) / (G,). ``leave_one_out``: query i is
    gallery item i and is left out of its own ranking (Q == G); ``exclude`` (Q,): the gallery position left
    out of each query's ranking (the query is that gallery item). Full ranking, cosine. Returns one
    ``{"top1", "top5", "mAP"}`` per fraction.
    """
    n_q, n_g = len(queries), len(old)
    if leave_one_out:
        if n_q != n_g:
            raise ValueError("leave_one_out needs the queries to be the gallery items (Q == G)")
        exclude = np.arange(n_q)
    rank = np.empty(n_g, dtype=np.int64)
    rank[np.asarray(order, dtype=np.int64)] = np.arange(n_g)
    sums = [dict.fromkeys(QUALITY_KEYS, 0.0) for _ in fractions]
    for s in range(0, n_q, chunk):
        q = queries[s : s + chunk].astype(np.float32)
        ql = query_labels[s : s + chunk]
        sim_old, sim_new = q @ old.T.astype(np.float32), q @ new.T.astype(np.float32)  # (b, G) each
        rel_all = gallery_labels[None, :] == ql[:, None]  # (b, G)
        n_rel = rel_all.sum(axis=1)
        rows = np.arange(len(q))
        if exclude is not None:
            own = np.asarray(exclude[s : s + chunk], dtype=np.int64)
            n_rel = n_rel - rel_all[rows, own]
        for j, f in enumerate(fractions):
            sims = np.where(rank[None, :] < start + round(f * (n_g - start)), sim_new, sim_old)
            if exclude is not None:
                sims[rows, own] = -np.inf  # ranked last, then cut off
            ranked = np.argsort(-sims, axis=1, kind="stable")
            rel = np.take_along_axis(rel_all, ranked, axis=1)
            if exclude is not None:
                rel = rel[:, :-1]
            for key, v in relevance_metrics(rel, n_rel).items():
                if key in sums[j]:
                    sums[j][key] += v
    return [{k: v / max(n_q, 1) for k, v in s.items()} for s in sums]


@dataclass
class Sample:
    """The gallery as the simulation sees it: stored (old) and candidate (new) embeddings of its G items,
    labels, policy orders, and which of them are the queries."""

    item_ids: np.ndarray  # (G,)
    labels: np.ndarray  # (G,)
    old: np.ndarray  # (G, D) stored embeddings in the serving space
    new: np.ndarray  # (G, D') candidate embeddings (the stored one where no source could be embedded)
    orders: dict[str, np.ndarray] = field(default_factory=dict)  # policy -> positions into the gallery
    done: int = 0  # the first ``done`` positions of every order are embedded by the candidate already
    queries: np.ndarray | None = None  # (Q,) gallery positions of the query items (None: every item)
    embedded: np.ndarray | None = None  # (G,) bool: ``new`` is the candidate's embedding of the source

    @property
    def query_positions(self) -> np.ndarray:
        return np.arange(len(self.old)) if self.queries is None else self.queries


def simulate(
    sample: Sample, same_space: bool, fractions: Sequence[float] = FRACTIONS
) -> dict[str, list[dict]]:
    """Per policy, the expected quality at each fraction (see the module docstring)."""
    out: dict[str, list[dict]] = {}
    q = sample.query_positions
    ql = sample.labels[q]
    identity = np.arange(len(sample.old))
    if not same_space:
        current = mixed_gallery_quality(
            sample.old[q], ql, sample.old, sample.old, sample.labels, identity, [0.0], exclude=q
        )[0]
        full = mixed_gallery_quality(
            sample.new[q], ql, sample.new, sample.new, sample.labels, identity, [1.0], exclude=q
        )[0]
        for policy in sample.orders:
            out[policy] = [full if f >= 1.0 else current for f in fractions]
        return out
    for policy, order in sample.orders.items():
        out[policy] = mixed_gallery_quality(
            sample.new[q],
            ql,
            sample.old,
            sample.new,
            sample.labels,
            order,
            fractions,
            exclude=q,
            start=sample.done,
        )
    return out


def simulate_after_transform(
    sample: Sample, transformed: np.ndarray, candidate: LoadedModel, fractions: Sequence[float] = FRACTIONS
) -> dict[str, list[dict]]:
    """Per policy, the expected quality when ``candidate`` serves over the transformed gallery
    (``transformed`` (G, D'): each stored vector mapped into its space) and an image backfill then replaces
    the transformed vectors by true ones in the policy's order, as the runner orders them once the candidate
    is active (uncertainty: the candidate's margin on the transformed vector). Fraction 0 is the transform
    alone. Items whose source could not be embedded keep their transformed vector throughout."""
    q = sample.query_positions
    ql = sample.labels[q]
    true = sample.new
    if sample.embedded is not None:
        true = np.where(sample.embedded[:, None], sample.new, transformed)
    orders = {
        "sequential": np.argsort(sample.item_ids, kind="stable"),
        "uncertainty": order_by_scores(sample.item_ids, margin_scores(candidate, transformed)),
    }
    return {
        p: mixed_gallery_quality(true[q], ql, transformed, true, sample.labels, o, fractions, exclude=q)
        for p, o in orders.items()
    }


def card_line(
    no_backfill: dict[str, float] | None,
    full: dict[str, float] | None,
    same_space: bool,
    current: dict[str, float] | None,
    fractions: Sequence[float] = FRACTIONS,
) -> list[dict] | None:
    """The card's estimate: linear from new/old (or, for another space, the current quality) to new/new."""
    start = no_backfill if same_space else current
    if not start or not full:
        return None
    keys = [k for k in QUALITY_KEYS if k in start and k in full]
    if not same_space:
        return [{k: (full[k] if f >= 1.0 else start[k]) for k in keys} for f in fractions]
    return [{k: start[k] + f * (full[k] - start[k]) for k in keys} for f in fractions]


def first_fraction_reaching(
    curve: Sequence[dict], fractions: Sequence[float], share: float = 0.9, key: str = "mAP"
) -> float | None:
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
    max_gallery: int = 20_000,
    label_key: str = "label",
) -> tuple[Sample | None, dict[str, int]]:
    """The labelled gallery of ``space`` (a seeded subsample of ``max_gallery`` above that) embedded by
    ``candidate`` from its kept sources, with both policies' orders, and a seeded sample of up to ``size``
    of its items with a source as the queries. Returns ``(sample or None, counts)``."""
    all_ids, all_versions, all_old = gallery.space_embeddings(space)
    records = gallery.items_by_id(all_ids.tolist())
    labels_all = [label_of(records[i][2], label_key) if i in records else None for i in all_ids.tolist()]
    keep_rows = [r for r, lab in enumerate(labels_all) if lab is not None]
    rng = np.random.default_rng(seed)
    with_source = [
        r
        for r in keep_rows
        if records[int(all_ids[r])][1] is not None and blobs.exists(records[int(all_ids[r])][1] or "")
    ]
    counts = {"with_source": len(with_source), "labelled": len(keep_rows)}
    if len(keep_rows) > max_gallery:
        keep_rows = sorted(rng.choice(np.asarray(keep_rows), size=max_gallery, replace=False).tolist())
        counts["gallery_subsampled"] = 1
    if len(keep_rows) < MIN_LABELLED or len(with_source) < MIN_LABELLED:
        counts["sampled"] = 0
        return None, counts
    ids = all_ids[keep_rows]
    old = all_old[keep_rows]
    versions = [all_versions[r] for r in keep_rows]
    labels = np.asarray([labels_all[r] for r in keep_rows], dtype=np.int64)
    prep = candidate.preprocess
    new = (
        old.copy()
        if old.shape[1] == candidate.card.embedding_dim
        else np.zeros((len(ids), candidate.card.embedding_dim), np.float32)
    )
    embedded = np.zeros(len(ids), dtype=bool)
    pos, images = [], []
    for p, iid in enumerate(ids.tolist()):
        uri = records[iid][1]
        raw = blobs.get(uri) if uri else None
        if raw is None:
            continue
        try:
            images.append(
                decode_image(
                    raw,
                    prep=prep,
                    max_pixels=max_pixels,
                    what=f"item {records[iid][0]!r}",
                )
            )
            pos.append(p)
        except (BadImage, TooLarge):
            continue
    for s in range(0, len(pos), 1024):  # bounded memory: decoded images a batch at a time
        chunk = pos[s : s + 1024]
        new[chunk] = embed_images(candidate, np.stack(images[s : s + 1024]))
    embedded[pos] = True
    counts["simulated"] = int(embedded.sum())
    usable_q = np.flatnonzero(embedded)
    if len(usable_q) < MIN_LABELLED:
        return None, counts
    queries = (
        np.sort(rng.choice(usable_q, size=min(size, len(usable_q)), replace=False)) if size > 0 else usable_q
    )
    counts["sampled"] = int(len(queries))
    counts["gallery"] = int(len(ids))
    is_done = np.asarray([v == candidate.version for v in versions])
    # the runner's scores (service.backfill.order.uncertainty_order), over the gallery
    scores = (
        margin_scores(candidate, old)
        if candidate.card.space == space
        else uncertainty_scores(versions, old, model_of)
    )
    todo = np.flatnonzero(~is_done)
    done_first = np.flatnonzero(is_done)
    orders = {
        "sequential": np.concatenate([done_first, todo[np.argsort(ids[todo], kind="stable")]]),
        "uncertainty": np.concatenate([done_first, todo[order_by_scores(ids[todo], scores[todo])]]),
    }
    return Sample(
        item_ids=ids,
        labels=labels,
        old=old,
        new=new,
        orders=orders,
        done=len(done_first),
        queries=queries,
        embedded=embedded,
    ), counts


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
