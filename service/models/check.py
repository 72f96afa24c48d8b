"""The compatibility check: a candidate measured against the gallery as stored, before it may serve.

A card says which space a model writes into; this measures whether its embeddings really live there. On a
seeded sample of gallery items whose sources are kept, each item's source is embedded by the candidate and
by the active model, and both search the stored gallery (the item itself left out):

- without labels: how often the candidate's top-10 holds the active model's top-10 (overlap@10), and the
  share of queries whose active top-1 is no longer in the candidate's top-10 ("lost"), each beside the
  same figures for a random model of the candidate's shape (the no-information baseline);
- with labels (the metadata key ``label_key``): top-1, top-5 and mAP of candidate/gallery against
  active/gallery over the full ranking, retrieval negative and positive flip rates (top-1 right before and
  wrong after, and the reverse), and the same split by the query's class: ``old`` (known to both models),
  ``new`` (known to the candidate only), ``unseen`` (known to neither).

The verdict: with enough labelled queries, the candidate must not be worse than the active model on top-1
and mAP (within ``tolerance``); otherwise its overlap@10 must beat the baseline's by ``min_overlap_gain``.
Nothing to measure (no active model, an empty gallery, no kept sources) falls back to the card's space and
says so. Results are cached per candidate and gallery state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from index import Gallery
from service.blobs import BlobStore
from service.errors import BadImage, TooLarge
from service.images import decode_image
from service.labels import label_of
from service.models.cache import ModelCache
from trainer import LoadedModel, embed_images, random_twin, relevance_metrics

log = logging.getLogger(__name__)

MIN_LABELLED = 20  # fewer labelled queries than this: the labelled figures are too noisy to decide on
TOP = 10


@dataclass(frozen=True)
class CheckOptions:
    # mAP varies a lot from query to query: at 300 queries the figure wanders +-0.03 around the full
    # protocol's, at 1,000 about +-0.02 (bench/check.py)
    sample_size: int = 1000
    label_key: str = "label"
    seed: int = 0
    tolerance: float = 0.01  # how much worse than the active model (top-1, mAP) a candidate may measure
    min_overlap_gain: float = 0.2  # unlabelled: overlap@10 above the random baseline's, at least
    max_gallery: int = 200_000  # full rankings over at most this many stored items (a seeded subsample above)
    max_pixels: int = 1 << 20


def _rankings(queries: np.ndarray, gallery: np.ndarray, self_pos: np.ndarray, chunk: int = 256) -> np.ndarray:
    """(Q, G-1) gallery positions, best first, each query's own position left out. Cosine on unit rows."""
    out = np.empty((len(queries), gallery.shape[0] - 1), dtype=np.int64)
    g = gallery.astype(np.float32)
    for s in range(0, len(queries), chunk):
        sims = queries[s : s + chunk].astype(np.float32) @ g.T  # (b, G)
        rows = np.arange(sims.shape[0])
        sims[rows, self_pos[s : s + chunk]] = -np.inf
        out[s : s + chunk] = np.argsort(-sims, axis=1, kind="stable")[:, :-1]
    return out


def _overlap(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean overlap@10 of two (Q, >=10) rankings, and the share of queries whose ``a`` top-1 is not in
    ``b``'s top-10."""
    inter = [len(set(x[:TOP].tolist()) & set(y[:TOP].tolist())) / TOP for x, y in zip(a, b, strict=True)]
    lost = [int(x[0]) not in set(y[:TOP].tolist()) for x, y in zip(a, b, strict=True)]
    return float(np.mean(inter)), float(np.mean(lost))


def _quality(ranked_labels: np.ndarray, qlabels: np.ndarray, n_rel: np.ndarray) -> dict[str, float]:
    rel = ranked_labels == qlabels[:, None]
    sums = relevance_metrics(rel, n_rel)
    n = max(len(qlabels), 1)
    return {k: round(v / n, 4) for k, v in sums.items()}


class CompatibilityCheck:
    """Measures candidates against the gallery. Thread-safe; results cached per (candidate, gallery state)."""

    def __init__(self, gallery: Gallery, models: ModelCache, blobs: BlobStore, options: CheckOptions) -> None:
        self.gallery, self.models, self.blobs, self.options = gallery, models, blobs, options
        self._cache: dict[tuple, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._running = threading.Lock()  # one measurement at a time: each is seconds of CPU

    def state_key(self, candidate: str, active: str | None) -> tuple:
        """What a result depends on: the pair of models and the gallery's contents per version."""
        return (candidate, active, tuple(sorted(self.gallery.counts_by_version().items())))

    def cached(self, candidate: str, active: str | None) -> dict[str, Any] | None:
        with self._lock:
            return self._cache.get(self.state_key(candidate, active))

    def measure(self, candidate: str, active: LoadedModel | None, active_space: str | None) -> dict[str, Any]:
        """The check of ``candidate`` against the stored gallery as the ``active`` model serves it."""
        key = self.state_key(candidate, active.version if active else None)
        with self._running:
            with self._lock:
                hit = self._cache.get(key)
            if hit is not None:
                return hit
            result = self._measure(candidate, active, active_space)
            with self._lock:
                if len(self._cache) >= 16:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[key] = result
            return result

    # ------------------------------------------------------------------ measuring
    def _fallback(self, candidate: str, why: str) -> dict[str, Any]:
        return {
            "candidate": candidate,
            "method": "card",
            "passed": True,
            "reason": why,
            "detail": f"nothing measured ({why}): the decision falls back to the card's space",
        }

    def _measure(
        self, candidate: str, active: LoadedModel | None, active_space: str | None
    ) -> dict[str, Any]:
        t0 = time.perf_counter()
        opts = self.options
        cand = self.models.get(candidate)
        if active is None or active_space is None:
            return self._fallback(candidate, "no model is active: there is nothing to compare with")
        if self.gallery.count() == 0:
            return self._fallback(candidate, "the gallery is empty")
        cand_space = cand.card.space
        spaces = self.gallery.spaces()
        if cand_space not in spaces or self.gallery.live_counts(cand_space)[1] < self.gallery.count():
            return {
                "candidate": candidate,
                "method": "none",
                "passed": False,
                "reason": f"the gallery's items are not all embedded in {candidate}'s space {cand_space!r}",
                "detail": "its queries cannot be measured against embeddings of another space",
            }

        # The stored gallery of each model's space, as rows aligned by item id.
        g_ids_a, _, g_a = self.gallery.space_embeddings(active_space)
        g_ids_c, _, g_c = (
            (g_ids_a, None, g_a) if cand_space == active_space else self.gallery.space_embeddings(cand_space)
        )
        common = np.intersect1d(g_ids_a, g_ids_c)
        rng = np.random.default_rng(opts.seed)
        sources = {i: uri for i, _, uri in self.gallery.item_sources() if uri is not None}
        with_source = np.asarray([i for i in common.tolist() if i in sources], dtype=np.int64)
        if len(with_source) < 2:
            return self._fallback(candidate, "no item of the gallery has a kept source")
        sample = np.sort(rng.choice(with_source, size=min(opts.sample_size, len(with_source)), replace=False))
        gallery_ids = common
        subsampled = len(common) > opts.max_gallery
        if subsampled:
            rest = np.setdiff1d(common, sample)
            gallery_ids = np.sort(
                np.concatenate([sample, rng.choice(rest, opts.max_gallery - len(sample), replace=False)])
            )
        pos_a = {int(i): p for p, i in enumerate(g_ids_a.tolist())}
        pos_c = {int(i): p for p, i in enumerate(g_ids_c.tolist())}
        gal_a = g_a[[pos_a[int(i)] for i in gallery_ids]]
        gal_c = g_c[[pos_c[int(i)] for i in gallery_ids]]
        where = {int(i): p for p, i in enumerate(gallery_ids.tolist())}

        # Each sampled source, decoded for each model's input and embedded.
        records = self.gallery.items_by_id(sample.tolist())
        qa_imgs, qc_imgs, kept = [], [], []
        pa, pc = active.preprocess, cand.preprocess
        for iid in sample.tolist():
            raw = self.blobs.get(sources[iid])
            if raw is None:
                continue
            try:
                what = f"item {records[iid][0]!r}"
                qa_imgs.append(
                    decode_image(
                        raw, channels=pa.channels, size=pa.size, max_pixels=opts.max_pixels, what=what
                    )
                )
                qc_imgs.append(
                    decode_image(
                        raw, channels=pc.channels, size=pc.size, max_pixels=opts.max_pixels, what=what
                    )
                )
                kept.append(iid)
            except (BadImage, TooLarge):
                continue
        if len(kept) < 2:
            return self._fallback(candidate, "no sampled source decodes for both models")
        qa = embed_images(active, np.stack(qa_imgs))
        qc = embed_images(cand, np.stack(qc_imgs))
        self_pos = np.asarray([where[i] for i in kept], dtype=np.int64)
        rank_a = _rankings(qa, gal_a, self_pos)
        rank_c = _rankings(qc, gal_c, self_pos)
        overlap, lost = _overlap(rank_a, rank_c)
        twin = random_twin(cand, seed=opts.seed)
        if twin is not None:
            qb = embed_images(twin, np.stack(qc_imgs))
            baseline_what = f"a random model of {candidate}'s architecture (seed {opts.seed})"
        else:
            qb = rng.normal(size=qc.shape).astype(np.float32)
            qb /= np.linalg.norm(qb, axis=1, keepdims=True)
            baseline_what = "random unit vectors (an adapter version has no single architecture to randomise)"
        b_overlap, b_lost = _overlap(rank_a, _rankings(qb, gal_c, self_pos))
        result: dict[str, Any] = {
            "candidate": candidate,
            "active": active.version,
            "method": "measured",
            "sample": {
                "queries": len(kept),
                "with_source": int(len(with_source)),
                "gallery": int(len(gallery_ids)),
                "gallery_subsampled": subsampled,
                "seed": opts.seed,
            },
            "unlabelled": {
                "overlap_at_10": round(overlap, 4),
                "lost_top1": round(lost, 4),
                "baseline": {
                    "overlap_at_10": round(b_overlap, 4),
                    "lost_top1": round(b_lost, 4),
                    "what": baseline_what,
                },
            },
        }
        labelled = self._labelled(kept, gallery_ids, rank_a, rank_c, active, cand)
        if labelled is not None:
            result["labelled"] = labelled
        result.update(self._verdict(result))
        result["seconds"] = round(time.perf_counter() - t0, 3)
        log.info(
            "check of %s against %s: %s (%s)",
            candidate,
            active.version,
            "passed" if result["passed"] else "failed",
            result["criterion"],
        )
        return result

    def _labelled(
        self,
        kept: Sequence[int],
        gallery_ids: np.ndarray,
        rank_a: np.ndarray,
        rank_c: np.ndarray,
        active: LoadedModel,
        cand: LoadedModel,
    ) -> dict[str, Any] | None:
        key = self.options.label_key
        meta = self.gallery.items_by_id(gallery_ids.tolist())
        g_lab = np.asarray(
            [label_of(meta[int(i)][2], key) if int(i) in meta else None for i in gallery_ids], dtype=object
        )
        has = np.asarray([v is not None for v in g_lab])
        where = {int(i): p for p, i in enumerate(gallery_ids.tolist())}
        q_rows = [r for r, iid in enumerate(kept) if has[where[iid]]]
        if len(q_rows) < MIN_LABELLED:
            return None
        labels = np.where(has, g_lab, -(10**9)).astype(np.int64)  # unlabelled items never match
        ql = np.asarray([labels[where[kept[r]]] for r in q_rows], dtype=np.int64)
        n_rel = np.asarray([(labels == lab).sum() - 1 for lab in ql], dtype=np.int64)
        la, lc = labels[rank_a[q_rows]], labels[rank_c[q_rows]]
        right_a, right_c = la[:, 0] == ql, lc[:, 0] == ql
        old_classes, new_classes = set(active.card.classes), set(cand.card.classes)

        def figures(mask: np.ndarray) -> dict[str, Any]:
            return {
                "queries": int(mask.sum()),
                "active": _quality(la[mask], ql[mask], n_rel[mask]),
                "candidate": _quality(lc[mask], ql[mask], n_rel[mask]),
                "negative_flip_rate": round(float((right_a & ~right_c)[mask].mean()), 4)
                if mask.any()
                else None,
                "positive_flip_rate": round(float((~right_a & right_c)[mask].mean()), 4)
                if mask.any()
                else None,
            }

        everything = np.ones(len(ql), dtype=bool)
        split = {
            "old": np.asarray([c in old_classes and c in new_classes for c in ql.tolist()]),
            "new": np.asarray([c in new_classes and c not in old_classes for c in ql.tolist()]),
            "unseen": np.asarray([c not in new_classes and c not in old_classes for c in ql.tolist()]),
        }
        out = {"label_key": key, **figures(everything)}
        out["by_class"] = {name: figures(m) for name, m in split.items() if m.any()}
        return out

    def _verdict(self, result: dict[str, Any]) -> dict[str, Any]:
        opts = self.options
        lab = result.get("labelled")
        if lab is not None:
            a, c = lab["active"], lab["candidate"]
            worse = [k for k in ("top1", "mAP") if c[k] < a[k] - opts.tolerance]
            criterion = (
                f"labelled: candidate/gallery top-1 and mAP at least active/gallery's minus "
                f"{opts.tolerance} (top-1 {c['top1']} vs {a['top1']}, mAP {c['mAP']} vs {a['mAP']})"
            )
            return {
                "passed": not worse,
                "criterion": criterion,
                "threshold": {
                    "tolerance": opts.tolerance,
                    "top1": round(a["top1"] - opts.tolerance, 4),
                    "mAP": round(a["mAP"] - opts.tolerance, 4),
                },
                "reason": None
                if not worse
                else f"measured worse than the active model on {', '.join(worse)}",
            }
        u = result["unlabelled"]
        need = round(u["baseline"]["overlap_at_10"] + opts.min_overlap_gain, 4)
        passed = u["overlap_at_10"] >= need
        return {
            "passed": passed,
            "criterion": (
                f"unlabelled: overlap@10 with the active model's results at least the random "
                f"baseline's + {opts.min_overlap_gain} ({u['overlap_at_10']} vs {need})"
            ),
            "threshold": {"overlap_at_10": need},
            "reason": None
            if passed
            else "its queries find what the active model finds no better than chance",
        }
