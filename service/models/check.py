"""The compatibility check: a candidate measured against the gallery as stored, before it may serve.

A card says which space a model writes into; this measures whether its embeddings really live there. On a
seeded sample of gallery items whose sources are kept, each item's source is embedded by the candidate and
by the active model, and both search the stored gallery (the item itself left out):

- without labels: how often the candidate's top-10 holds the active model's top-10 (overlap@10), and the
  share of queries whose active top-1 is no longer in the candidate's top-10 ("lost"), each beside the
  same figures for a random model of the candidate's shape (the no-information baseline);
- with labels (the metadata key ``label_key``): top-1, top-5 and mAP of candidate/gallery against
  active/gallery over the full ranking, retrieval negative and positive flip rates (top-1 right before and
  wrong after, and the reverse; ``retrieval_flips`` adds their counts and names the first flipped items by
  external id, trainer.metrics.retrieval_flips), and the same split by the query's class: ``old`` (known to
  both models), ``new`` (known to the candidate only), ``unseen`` (known to neither); on a gallery mixing
  generations, also per generation (the items each version embedded, ``by_generation``).
- the candidate's lineage and the gallery's generations (which versions made the stored vectors, and
  whether each is the candidate or one of its ancestors): a chain of BCT children serves a gallery that
  several of its generations embedded.

The verdict: with enough labelled queries, the candidate must not be worse than the active model on top-1
and mAP (within ``tolerance``); otherwise its overlap@10 must beat the baseline's by ``min_overlap_gain``.
Nothing to measure (no active model, an empty gallery, no kept sources, an external version on either side)
falls back to the card's space and says so. Results are cached per candidate and gallery state.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from index import Gallery
from service.blobs import BlobStore
from service.errors import BadImage, TooLarge
from service.images import decode_image
from service.labels import label_of
from service.models.cache import ModelCache
from service.models.lineage import lineage, parents_of
from trainer import LoadedModel, embed_images, random_twin, retrieval_flips

log = logging.getLogger(__name__)

NO_LABEL = -(2**62)  # the class of an item without one: it never matches a query's class
MIN_LABELLED = 20  # fewer labelled queries than this: the labelled figures are too noisy to decide on
TOP = 10
FLIPS_LISTED = 50  # flipped queries named in ``retrieval_flips`` (their external ids); the counts are whole


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


CHUNK = 128  # queries ranked at a time: memory is CHUNK x gallery positions, never queries x gallery


def _rankings(queries: np.ndarray, gallery: np.ndarray, self_pos: np.ndarray) -> np.ndarray:
    """(Q, G-1) gallery positions, best first, each query's own position left out. Cosine on unit rows;
    ``gallery`` (G, D) float32."""
    sims = queries.astype(np.float32) @ gallery.T  # (Q, G)
    sims[np.arange(len(queries)), self_pos] = -np.inf
    return np.argsort(-sims, axis=1, kind="stable")[:, :-1]


def _overlap(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query: overlap@10 of two (Q, >=10) rankings, and whether ``a``'s top-1 is missing from ``b``'s
    top-10."""
    inter = np.asarray(
        [len(set(x[:TOP].tolist()) & set(y[:TOP].tolist())) / TOP for x, y in zip(a, b, strict=True)]
    )
    lost = np.asarray([int(x[0]) not in set(y[:TOP].tolist()) for x, y in zip(a, b, strict=True)])
    return inter, lost


def _per_query(ranked: np.ndarray, labels: np.ndarray, ql: np.ndarray, n_rel: np.ndarray) -> np.ndarray:
    """(Q, 3): top-1 hit, top-5 hit (any of the first five has the query's class) and average precision."""
    rel = labels[ranked] == ql[:, None]  # (Q, G-1)
    precision = np.cumsum(rel, axis=1) / np.arange(1, rel.shape[1] + 1)
    ap = (precision * rel).sum(axis=1) / np.maximum(n_rel, 1)
    return np.stack([rel[:, 0], rel[:, :5].any(axis=1), ap], axis=1).astype(np.float64)


def _per_query_within(
    ranked: np.ndarray, labels: np.ndarray, ql: np.ndarray, within: np.ndarray, self_pos: np.ndarray
) -> np.ndarray:
    """Like :func:`_per_query`, over the part of the gallery ``within`` (G,) bool (say, the items one
    generation embedded): the full ranking filtered to it, so no second ranking is needed."""
    sel = within[ranked]  # (Q, G-1)
    rel = (labels[ranked] == ql[:, None]) & sel
    seen = np.cumsum(sel, axis=1)
    n_rel = ((labels[None, :] == ql[:, None]) & within[None, :]).sum(axis=1)
    n_rel = n_rel - ((labels[self_pos] == ql) & within[self_pos])
    precision = np.cumsum(rel, axis=1) / np.maximum(seen, 1)
    ap = (precision * rel).sum(axis=1) / np.maximum(n_rel, 1)
    first = np.argmax(sel, axis=1)
    top1 = rel[np.arange(len(ql)), first] & sel.any(axis=1)
    top5 = (rel & (seen <= 5)).any(axis=1)
    return np.stack([top1, top5, ap], axis=1).astype(np.float64)


def _quality(stats: np.ndarray) -> dict[str, float]:
    means = stats.mean(axis=0) if len(stats) else np.zeros(3)
    return {
        "top1": round(float(means[0]), 4),
        "top5": round(float(means[1]), 4),
        "mAP": round(float(means[2]), 4),
    }


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
        external = next((m.version for m in (cand, active) if m.card.external), None)
        if external is not None:  # its embeddings are computed outside graceful: no source can be embedded
            return self._fallback(candidate, f"{external} is external: graceful cannot embed images with it")
        if self.gallery.count() == 0:
            return self._fallback(candidate, "the gallery is empty")
        cand_space = cand.card.space
        spaces = self.gallery.spaces()
        total, in_space = self.gallery.live_counts(cand_space) if cand_space in spaces else (1, 0)
        if in_space < total:  # both counts from one place: an ingest landing meanwhile cannot split them
            return {
                "candidate": candidate,
                "method": "none",
                "passed": False,
                "reason": f"the gallery's items are not all embedded in {candidate}'s space {cand_space!r}",
                "detail": "its queries cannot be measured against embeddings of another space",
            }

        # The stored gallery of each model's space, as rows aligned by item id.
        g_ids_a, vers_a, g_a = self.gallery.space_embeddings(active_space)
        g_ids_c, vers_c, g_c = (
            (g_ids_a, vers_a, g_a)
            if cand_space == active_space
            else self.gallery.space_embeddings(cand_space)
        )
        common = np.intersect1d(g_ids_a, g_ids_c)
        rng = np.random.default_rng(opts.seed)
        sources = {i: uri for i, _, uri in self.gallery.item_sources() if uri is not None}
        with_source = np.asarray([i for i in common.tolist() if i in sources], dtype=np.int64)
        if len(with_source) < 2:
            return self._fallback(candidate, "no item of the gallery has a kept source")
        size = min(opts.sample_size, len(with_source), opts.max_gallery)
        sample = np.sort(rng.choice(with_source, size=size, replace=False))
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
        # which generation (version) made each gallery item's vector in the candidate's space
        made_by = dict(zip(g_ids_c.tolist(), vers_c, strict=True))
        gen = np.asarray([made_by[int(i)] for i in gallery_ids.tolist()], dtype=object)
        gen_names = sorted(set(gen.tolist()))

        # Each sampled source, decoded for each model's input and embedded.
        records = self.gallery.items_by_id(sample.tolist())
        qa_imgs, qc_imgs, kept = [], [], []
        pa, pc = active.preprocess, cand.preprocess
        for iid in sample.tolist():
            raw = self.blobs.get(sources[iid])
            if raw is None or iid not in records:  # deleted since it was listed
                continue
            try:
                what = f"item {records[iid][0]!r}"
                qa_imgs.append(decode_image(raw, prep=pa, max_pixels=opts.max_pixels, what=what))
                qc_imgs.append(decode_image(raw, prep=pc, max_pixels=opts.max_pixels, what=what))
                kept.append(iid)
            except (BadImage, TooLarge):
                continue
        if len(kept) < 2:
            return self._fallback(candidate, "no sampled source decodes for both models")
        qa = embed_images(active, np.stack(qa_imgs))
        qc = embed_images(cand, np.stack(qc_imgs))
        self_pos = np.asarray([where[i] for i in kept], dtype=np.int64)
        twin = random_twin(cand, seed=opts.seed)
        if twin is not None:
            qb = embed_images(twin, np.stack(qc_imgs))
            baseline_what = f"a random model of {candidate}'s architecture (seed {opts.seed})"
        else:
            qb = rng.normal(size=qc.shape).astype(np.float32)
            qb /= np.linalg.norm(qb, axis=1, keepdims=True)
            baseline_what = (
                "random unit vectors (an adapter or ONNX version has no single architecture of graceful's "
                "to randomise)"
            )
        labels = self._labels(gallery_ids)
        ql = labels[self_pos] if labels is not None else None
        counts = dict(zip(*np.unique(labels, return_counts=True), strict=True)) if labels is not None else {}
        n_rel = np.asarray([counts.get(v, 1) - 1 for v in ql.tolist()]) if ql is not None else None
        g_a, g_c = gal_a.astype(np.float32), gal_c.astype(np.float32)
        n = len(kept)
        overlap, lost, b_overlap, b_lost = (np.empty(n) for _ in range(4))
        stats_a, stats_c = np.empty((n, 3)), np.empty((n, 3))
        masks = {v: gen == v for v in gen_names} if len(gen_names) > 1 else {}
        by_gen = {v: (np.empty((n, 3)), np.empty((n, 3))) for v in masks}
        for s in range(0, n, CHUNK):
            sl = slice(s, s + CHUNK)
            rank_a = _rankings(qa[sl], g_a, self_pos[sl])
            rank_c = _rankings(qc[sl], g_c, self_pos[sl])
            overlap[sl], lost[sl] = _overlap(rank_a, rank_c)
            b_overlap[sl], b_lost[sl] = _overlap(rank_a, _rankings(qb[sl], g_c, self_pos[sl]))
            if labels is not None and ql is not None and n_rel is not None:
                stats_a[sl] = _per_query(rank_a, labels, ql[sl], n_rel[sl])
                stats_c[sl] = _per_query(rank_c, labels, ql[sl], n_rel[sl])
                for v, mask in masks.items():
                    by_gen[v][0][sl] = _per_query_within(rank_a, labels, ql[sl], mask, self_pos[sl])
                    by_gen[v][1][sl] = _per_query_within(rank_c, labels, ql[sl], mask, self_pos[sl])
        result: dict[str, Any] = {
            "candidate": candidate,
            "active": active.version,
            "method": "measured",
            "sample": {
                "queries": n,
                "with_source": int(len(with_source)),
                "gallery": int(len(gallery_ids)),
                "gallery_subsampled": subsampled,
                "seed": opts.seed,
            },
            "unlabelled": {
                "overlap_at_10": round(float(overlap.mean()), 4),
                "lost_top1": round(float(lost.mean()), 4),
                "baseline": {
                    "overlap_at_10": round(float(b_overlap.mean()), 4),
                    "lost_top1": round(float(b_lost.mean()), 4),
                    "what": baseline_what,
                },
            },
        }
        parents = parents_of(
            [e.card for e in self.models.registry.survey() if e.card is not None], self.gallery
        )
        line = lineage(candidate, parents)
        result["lineage"] = line
        result["gallery_generations"] = {
            v: {
                "items": int((gen == v).sum()),
                "generation": len(lineage(v, parents)) + 1,
                "in_lineage": v == candidate or v in line,
            }
            for v in gen_names
        }
        if ql is not None:
            ext_ids = np.asarray([records[i][0] for i in kept], dtype=object)
            labelled = self._labelled(ql, stats_a, stats_c, active, cand, ext_ids)
            if labelled is not None:
                has = ql != NO_LABEL
                labelled["by_generation"] = {
                    v: {
                        "gallery_items": int(masks[v].sum()),
                        "active": _quality(a[has]),
                        "candidate": _quality(c[has]),
                    }
                    for v, (a, c) in by_gen.items()
                }
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

    def _labels(self, gallery_ids: np.ndarray) -> np.ndarray | None:
        """(G,) int64 class of each gallery item (``NO_LABEL`` where its metadata has none), or None when
        no item has one."""
        key = self.options.label_key
        meta = self.gallery.items_by_id(gallery_ids.tolist())
        found = [label_of(meta[int(i)][2], key) if int(i) in meta else None for i in gallery_ids.tolist()]
        if all(v is None for v in found):
            return None
        return np.asarray([NO_LABEL if v is None else v for v in found], dtype=np.int64)

    def _labelled(
        self,
        ql: np.ndarray,
        stats_a: np.ndarray,
        stats_c: np.ndarray,
        active: LoadedModel,
        cand: LoadedModel,
        ext_ids: np.ndarray | None = None,
    ) -> dict[str, Any] | None:
        """The labelled figures over the queries that have a class (``ql`` (Q,), per-query stats (Q, 3),
        ``ext_ids`` (Q,) the queries' external ids, naming the retrieval flips)."""
        has = ql != NO_LABEL
        if int(has.sum()) < MIN_LABELLED:
            return None
        ql, stats_a, stats_c = ql[has], stats_a[has], stats_c[has]
        ids = ext_ids[has] if ext_ids is not None else None
        right_a, right_c = stats_a[:, 0] > 0, stats_c[:, 0] > 0
        old_classes, new_classes = set(active.card.classes), set(cand.card.classes)

        def figures(mask: np.ndarray) -> dict[str, Any]:
            return {
                "queries": int(mask.sum()),
                "active": _quality(stats_a[mask]),
                "candidate": _quality(stats_c[mask]),
                "negative_flip_rate": round(float((right_a & ~right_c)[mask].mean()), 4),
                "positive_flip_rate": round(float((~right_a & right_c)[mask].mean()), 4),
            }

        split = {
            "old": np.asarray([c in old_classes and c in new_classes for c in ql.tolist()]),
            "new": np.asarray([c in new_classes and c not in old_classes for c in ql.tolist()]),
            "unseen": np.asarray([c not in new_classes and c not in old_classes for c in ql.tolist()]),
        }
        out = {"label_key": self.options.label_key, **figures(np.ones(len(ql), dtype=bool))}
        out["by_class"] = {name: figures(m) for name, m in split.items() if m.any()}
        flips = retrieval_flips(right_a, right_c, ids)
        for k in ("flipped_negative", "flipped_positive"):
            flips[k] = flips[k][:FLIPS_LISTED]
        out["retrieval_flips"] = {
            "old_setting": f"{active.version}/gallery",
            "new_setting": f"{cand.version}/gallery",
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in flips.items()},
            "listed": FLIPS_LISTED,
        }
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
