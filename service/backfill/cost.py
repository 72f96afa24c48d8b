"""The backfill-cost report: what re-embedding the gallery with a candidate would cost, and what it buys.

Throughput is measured, not assumed: a short timed batch through the same path a backfill takes (decode a
PNG, embed), on this machine, cached per version. Quality is measured on the gallery where its items keep
their sources and carry labels: no backfill (candidate queries over the stored embeddings) and today's
quality by the compatibility check (:mod:`service.models.check`), full backfill by the curve's last point;
otherwise it comes from the candidate's card (its compatibility matrix against its parent).

With ``workers`` N (several Ray actors, or machines), times divide the items by N x the measured single-worker
rate: a prediction, not a measurement with N workers (the report says so); a rate cap still caps the total.

The curve (``curve``): expected quality after 0-100% of the items are re-embedded, under each order policy,
and the time each fraction takes at the measured throughput (or a given items/s cap). Simulated on a sample
of the gallery's own items when their sources and labels are kept, else a line between the card's cells
(:mod:`service.backfill.curve` says how). ``cannot_backfill`` counts the items whose source is not kept.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from index import Gallery
from service.backfill.curve import (
    FRACTIONS,
    CurveCache,
    card_line,
    first_fraction_reaching,
    sample_gallery,
    simulate,
    simulate_after_transform,
)
from service.backfill.order import POLICIES
from service.blobs import BlobStore
from service.errors import NoTransform, ServiceError
from service.images import decode_image, encode_png
from service.models.cache import ModelCache
from service.models.hot_swap import HotSwap, backfill_report_url
from service.models.transforms import TransformStore
from trainer import LoadedModel, ModelCard, VectorTransform, embed_images

QUALITY_KEYS = ("top1", "top5", "mAP")
TRANSFORM_PROBE = 2000  # items a transform's rate is timed on
WORKERS_NOTE = "predicted from the measured single-worker rate x N; not measured with N workers"


@dataclass(frozen=True)
class Throughput:
    images_per_second: float
    batch: int
    seconds: float
    threads: int
    measured_at: float


class ThroughputProbe:
    """Times ``n`` images through decode + embed with a model; results cached per version."""

    def __init__(self, n_images: int, threads: int, batch_size: int = 256) -> None:
        self.n_images, self.threads, self.batch_size = n_images, threads, batch_size
        self._cache: dict[str, Throughput] = {}
        self._lock = threading.Lock()

    def measure(self, loaded: LoadedModel) -> Throughput:
        with self._lock:
            hit = self._cache.get(loaded.version)
            if hit:
                return hit
            prep = loaded.preprocess
            rng = np.random.default_rng(0)
            pngs = [
                encode_png(rng.integers(0, 256, prep.shape, dtype=np.uint8))
                for _ in range(min(self.n_images, 64))
            ]
            embed_images(loaded, np.zeros((8, *prep.shape), np.uint8))  # warm
            t0 = time.perf_counter()
            done = 0
            while done < self.n_images:
                n = min(self.batch_size, self.n_images - done)
                batch = np.stack(
                    [
                        decode_image(
                            pngs[(done + i) % len(pngs)],
                            prep=prep,
                            max_pixels=1 << 30,
                            what="probe",
                        )
                        for i in range(n)
                    ]
                )
                embed_images(loaded, batch)
                done += n
            seconds = time.perf_counter() - t0
            tp = Throughput(
                images_per_second=done / seconds,
                batch=self.batch_size,
                seconds=seconds,
                threads=self.threads,
                measured_at=time.time(),
            )
            self._cache[loaded.version] = tp
            return tp


def _quality(matrix: dict[str, Any], key: str) -> dict[str, float] | None:
    cell = matrix.get(key)
    return {k: cell[k] for k in QUALITY_KEYS if k in cell} if cell else None


def _cannot_backfill(gallery: Any, blobs: BlobStore | None, limit: int = 20) -> dict[str, Any]:
    """Items a backfill would skip: no source kept, or a source that is not in the blob store."""
    missing = [
        (e, "no source kept" if u is None else "source not in the blob store")
        for _, e, u in gallery.item_sources()
        if u is None or (blobs is not None and not blobs.exists(u))
    ]
    return {"count": len(missing), "examples": [{"external_id": e, "reason": r} for e, r in missing[:limit]]}


class CostReport:
    """The backfill-cost report of one app (docs/architecture.md): what re-embedding costs, and what each fraction buys."""

    def __init__(
        self,
        swap: HotSwap,
        models: ModelCache,
        probe: ThroughputProbe,
        *,
        blobs: BlobStore | None,
        curves: CurveCache | None,
        price_per_cpu_hour: float,
        sample_size: int = 1000,
        max_pixels: int = 1 << 20,
        label_key: str = "label",
        transforms: TransformStore | None = None,
    ) -> None:
        self.label_key = label_key
        self.transforms = transforms or TransformStore(swap.registry)
        self._transform_rates: dict[tuple, float] = {}
        self.swap, self.models, self.probe = swap, models, probe
        self.gallery: Gallery = swap.gallery
        self.blobs, self.curves = blobs, curves
        self.price_per_cpu_hour, self.sample_size, self.max_pixels = (
            price_per_cpu_hour,
            sample_size,
            max_pixels,
        )

    def report(self, candidate: str, rate_limit: float | None = None, workers: int = 1) -> dict[str, Any]:
        """The report for ``candidate`` (a valid version: ModelNotFound / InvalidModel otherwise), with the
        curve of expected quality per fraction backfilled and the items that cannot be backfilled; times
        for ``workers`` workers of the measured rate each (capped by ``rate_limit``, items/s)."""
        workers = max(1, int(workers))
        entry = self.swap.registry.entry(candidate)
        card = entry.card
        assert card is not None  # entry() raises for refused folders
        gallery = self.gallery
        total = gallery.count()
        by_version = gallery.counts_by_version()
        in_space = gallery.count(card.space) if card.space in gallery.spaces() else 0
        done, _ = gallery.backfill.progress(candidate)
        to_reembed = total - done
        problem = self.swap.problem(card)
        if card.external:
            return self._external(card, total, by_version, in_space, done, problem)

        loaded = self.models.get(candidate)
        tp = self.probe.measure(loaded)
        combined = tp.images_per_second * workers  # images/s of N workers, each as fast as the one measured
        per_second = min(combined, rate_limit) if rate_limit else combined
        seconds = to_reembed / per_second if per_second > 0 else float("inf")
        cpu_hours = seconds * tp.threads * workers / 3600.0

        # Which version's embeddings a no-backfill search would meet: the one holding most items of the space.
        space_versions = {
            v: n
            for v, n in by_version.items()
            if n and v in {x.version for x in gallery.list_versions() if x.space == card.space}
        }
        gallery_version = max(space_versions, key=lambda v: space_versions[v]) if space_versions else None
        matrix = card.metrics.get("matrix", {}) if card.metrics else {}
        quality: dict[str, Any] = {
            "source": f"model card of {candidate} (test split of its training data)",
            "current": _quality(matrix, f"{gallery_version}/{gallery_version}") if gallery_version else None,
            "no_backfill": None
            if problem
            else (_quality(matrix, f"{candidate}/{gallery_version}") if gallery_version else None),
            "full_backfill": _quality(matrix, f"{candidate}/{candidate}"),
        }
        same_space = card.space == self.swap.serving_space()
        transform, transform_why = self._transform(candidate, card)
        curve = self._curve(loaded, quality, same_space, to_reembed, per_second, transform)
        after_transform = curve.pop("after_transform", None)
        measured = self._measured(candidate, problem, curve, same_space)
        if measured:
            quality.update(measured)
        return {
            "candidate": candidate,
            "space": card.space,
            "compatible_with": card.compatible_with,
            "items_total": total,
            "items_per_version": by_version,
            "items_in_candidate_space": in_space,
            "items_embedded_by_candidate": done,
            "items_to_reembed": to_reembed,
            "needs_backfill": problem is not None,
            "reason": problem,
            "throughput": {
                "images_per_second": round(tp.images_per_second, 1),
                "measured_images": self.probe.n_images,
                "threads": tp.threads,
                "what": f"decode PNG + embed, batches of {tp.batch}, on this machine",
                "rate_limit": rate_limit,
                "workers": workers,
                "per_worker_images_per_second": round(tp.images_per_second, 1),
                "predicted_images_per_second": round(per_second, 1),
                "note": WORKERS_NOTE if workers > 1 else "measured with one worker",
            },
            "predicted": {
                "workers": workers,
                "wall_seconds": round(seconds, 2),
                # significant digits, not decimals: a small gallery's cost must not read as zero
                "wall_hours": float(f"{seconds / 3600.0:.4g}"),
                "cpu_hours": float(f"{cpu_hours:.4g}"),
                "cost": float(f"{cpu_hours * self.price_per_cpu_hour:.4g}"),
                "price_per_cpu_hour": self.price_per_cpu_hour,
                "currency": "USD",
            },
            "quality": quality,
            "curve": curve,
            "cannot_backfill": _cannot_backfill(gallery, self.blobs),
            "ladder": self._ladder(
                candidate,
                card,
                problem,
                quality,
                curve,
                to_reembed,
                per_second,
                tp.threads * workers,
                transform,
                transform_why,
                after_transform,
            ),
            "report_url": backfill_report_url(candidate),
        }

    # ------------------------------------------------------------------ the ladder
    def _transform(self, candidate: str, card: ModelCard) -> tuple[VectorTransform | None, str | None]:
        """The transform from the serving version into ``candidate``'s space, or None and why not."""
        active = self.swap.active
        if card.space == self.swap.serving_space():
            return None, "same space: the candidate serves the stored vectors as they are"
        if active is None:
            return None, "no model is active: nothing says whose stored vectors to map"
        try:
            return self.transforms.get(candidate, active.version), None
        except (NoTransform, ServiceError) as e:
            return None, str(e)

    def _transform_rate(self, candidate: str, transform: VectorTransform, source_space: str) -> float:
        """Items/s of a transform job on this gallery, timed on a sample of up to TRANSFORM_PROBE items:
        listing with their stored vectors (the job's query), the map, and the SQL write in a transaction
        rolled back (nothing stored). Cached per (candidate, transform, source space)."""
        key = (candidate, transform.card.weights_sha256, source_space)
        if key in self._transform_rates:
            return self._transform_rates[key]
        book = self.gallery.backfill
        t0 = time.perf_counter()
        ids, eids, vecs = book.pending_vectors(candidate, source_space, TRANSFORM_PROBE)
        if not ids:  # nothing left to map: the report needs no rate
            return 0.0
        t_list = time.perf_counter() - t0
        t0 = time.perf_counter()
        mapped = transform.apply(vecs)
        t_apply = time.perf_counter() - t0
        t_write = self.gallery.time_write(ids, mapped, candidate, route="transform")
        rate = len(vecs) / max(t_list + t_apply + t_write, 1e-9)
        self._transform_rates[key] = rate
        return rate

    def _adapter_rung(
        self, candidate: str, card: ModelCard, problem: str | None, quality: dict[str, Any]
    ) -> dict[str, Any]:
        serving = self.swap.serving_space()
        rung: dict[str, Any] = {"route": "query_adapter", "predicted": {"seconds": 0.0, "cost": 0.0}}
        if problem is None:
            return {
                **rung,
                "route": "no_backfill",
                "available": True,
                "how": f"activate {candidate}: it serves the stored vectors as they are (same space)",
                "quality": quality.get("no_backfill"),
                "quality_source": quality.get("source"),
            }
        adapters = [
            e.card
            for e in self.swap.registry.survey()
            if e.card is not None and e.card.adapter_of == candidate and e.card.space == serving
        ]
        if not adapters:
            active = self.swap.active.version if self.swap.active else "OLD"
            return {
                **rung,
                "available": False,
                "how": f"fit one: graceful adapt --new <models dir>/{candidate} --old <models dir>/{active} "
                f"--out <models dir>/{candidate}-adapter, then activate it (queries: {candidate}, then the "
                "adapter into the stored space)",
                "quality": None,
            }
        ad = adapters[0]
        measured: dict[str, Any] | None = None
        source: str | None = None
        if self.swap.active is not None and self.swap.active.version != ad.version:
            lab = self.swap.measure(ad.version).get("labelled")
            if lab:
                quality = dict(lab["candidate"])
                source = (
                    f"measured: the compatibility check of {ad.version}, {lab['queries']} labelled queries"
                )
        if quality is None and ad.metrics:
            quality = _quality(ad.metrics.get("matrix", {}), f"{ad.version}/{ad.compatible_with}")
            source = f"model card of {ad.version}" if quality else None
        return {
            **rung,
            "available": True,
            "version": ad.version,
            "how": f"activate {ad.version}: {candidate}'s queries mapped into the stored space, no backfill",
            "quality": measured,
            "quality_source": source,
        }

    def _ladder(
        self,
        candidate: str,
        card: ModelCard,
        problem: str | None,
        quality: dict[str, Any],
        curve: dict[str, Any],
        to_reembed: int,
        per_second: float,
        threads: int,
        transform: VectorTransform | None,
        transform_why: str | None,
        after_transform: dict[str, list[dict]] | None,
    ) -> list[dict[str, Any]]:
        """The ways to serve ``candidate``, cheapest first, each with its quality and predicted cost here:
        no backfill or a query adapter, a vector transform, an image backfill by fraction and order, a full
        re-embedding."""

        def cost(seconds: float, thr: int) -> dict[str, Any]:
            hours = seconds * thr / 3600.0
            return {
                "seconds": round(seconds, 3),
                "cpu_hours": float(f"{hours:.4g}"),
                "cost": float(f"{hours * self.price_per_cpu_hour:.4g}"),
            }

        total = self.gallery.count()
        ladder = [self._adapter_rung(candidate, card, problem, quality)]
        rung: dict[str, Any] = {"route": "vector_transform", "available": transform is not None}
        if transform is None:
            rung["how"] = transform_why
        else:
            assert self.swap.active is not None
            source = self.swap.active.version
            to_map = total - self.gallery.backfill.progress(candidate, "transform")[0]
            rate = self._transform_rate(candidate, transform, transform.card.source_space)
            seconds = to_map / rate if rate > 0 else 0.0
            rung.update(
                how=f"graceful backfill start {candidate} --kind transform --source {source}, then activate "
                f"{candidate}; an image backfill later replaces transformed vectors (see image_backfill)",
                source=source,
                items=to_map,
                items_per_second=round(rate, 1),
                seconds_per_million=round(1e6 / rate, 2) if rate > 0 else None,
                predicted=cost(seconds, 1),
                rate_what="timed on this gallery: the job's listing query with stored vectors, the map, and the "
                "SQL write in a rolled-back transaction (the index side of a write is not timed)",
                quality=after_transform["sequential"][0] if after_transform else None,
                quality_source=(
                    "simulated on the curve's labelled sample: candidate queries over the transformed stored "
                    "vectors"
                    if after_transform
                    else "not measured: no labelled items with kept sources"
                ),
            )
        ladder.append(rung)
        image: dict[str, Any] = {
            "route": "image_backfill",
            "available": per_second > 0,
            "items_per_second": round(per_second, 1),
            "how": f"graceful backfill start {candidate} [--policy uncertainty] [--stop-at F]",
        }
        if after_transform:
            image["serving"] = (
                "the candidate over the transformed gallery, transformed vectors replaced in order"
            )
            image["by_policy"] = {
                p: [
                    {
                        "fraction": f,
                        **cost(f * to_reembed / per_second if per_second > 0 else 0.0, threads),
                        "quality": {k: round(v, 4) for k, v in q.items()},
                    }
                    for f, q in zip(FRACTIONS, pts, strict=True)
                    if 0 < f < 1
                ]
                for p, pts in after_transform.items()
            }
        else:
            image["serving"] = curve["serving_during_backfill"]
            image["by_policy"] = {
                p: [
                    {
                        "fraction": pt["fraction"],
                        **cost(pt["seconds"] or 0.0, threads),
                        "quality": pt["quality"],
                    }
                    for pt in pts
                    if 0 < pt["fraction"] < 1
                ]
                for p, pts in curve["policies"].items()
            }
        ladder.append(image)
        full_seconds = to_reembed / per_second if per_second > 0 else float("inf")
        ladder.append(
            {
                "route": "full_reembed",
                "available": per_second > 0,
                "items": to_reembed,
                "predicted": cost(full_seconds, threads),
                "quality": quality.get("full_backfill"),
                "how": f"graceful backfill start {candidate}, then activate it",
            }
        )
        return ladder

    def _external(
        self,
        card: ModelCard,
        total: int,
        by_version: dict[str, int],
        in_space: int,
        done: int,
        problem: str | None,
    ) -> dict[str, Any]:
        """The report of an external candidate: the counts stand, but graceful cannot embed with it, so
        nothing is timed, priced or simulated; re-embedding is the team sending its vectors (upsert)."""
        how = (
            f"{card.version} is external: graceful cannot re-embed the gallery with it (no throughput to "
            f"measure, no cost to predict); send its vectors of the items to re-embed with POST /v1/items "
            f'({{"vector": [...], "model_version": "{card.version}"}}, upsert: true)'
        )
        return {
            "candidate": card.version,
            "format": card.format,
            "space": card.space,
            "compatible_with": card.compatible_with,
            "items_total": total,
            "items_per_version": by_version,
            "items_in_candidate_space": in_space,
            "items_embedded_by_candidate": done,
            "items_to_reembed": total - done,
            "needs_backfill": problem is not None,
            "reason": problem,
            "throughput": None,
            "predicted": None,
            "quality": None,
            "curve": None,
            "cannot_backfill": {"count": total - done, "examples": [], "reason": how},
            "report_url": backfill_report_url(card.version),
        }

    def _measured(
        self, candidate: str, problem: str | None, curve: dict[str, Any], same_space: bool
    ) -> dict[str, Any] | None:
        """Quality measured on this gallery, where it can be: no backfill and today's from the compatibility
        check (candidate and active queries over the stored gallery), full backfill from the simulated
        curve's last point (every labelled item re-embedded). None when neither was measured."""
        out: dict[str, Any] = {}
        sources = []
        if problem is None and self.swap.active is not None and self.swap.active.version != candidate:
            check = self.swap.measure(candidate)
            lab = check.get("labelled")
            if lab:
                out["no_backfill"] = dict(lab["candidate"])
                out["current"] = dict(lab["active"])
                sources.append(
                    f"no backfill and current: the compatibility check, {lab['queries']} labelled "
                    f"gallery items as queries over the stored gallery"
                )
        if curve["method"] == "simulated":
            points = next(iter(curve["policies"].values()), None)
            if points:
                out["full_backfill"] = dict(points[-1]["quality"])
                sources.append(
                    f"full backfill: the simulated curve at 100% ({curve['sample'].get('sampled', 0)} "
                    f"queries over {curve['sample'].get('gallery', 0)} re-embedded gallery items)"
                )
        if not out:
            return None
        out["source"] = "measured on this gallery: " + "; ".join(sources) + " (cells not measured: the card)"
        return out

    def _curve(
        self,
        loaded: LoadedModel,
        quality: dict[str, Any],
        same_space: bool,
        to_reembed: int,
        items_per_second: float,
        transform: VectorTransform | None = None,
    ) -> dict[str, Any]:
        """The report's curve: quality and time after each fraction, under each policy (see the module doc);
        with ``transform``, also ``after_transform``: the same after a vector transform (popped by the
        caller into the ladder)."""
        gallery, blobs, sample_size = self.gallery, self.blobs, self.sample_size
        space = self.swap.serving_space()

        def compute() -> tuple[dict[str, list[dict]] | None, dict[str, int], dict[str, list[dict]] | None]:
            if blobs is None or space is None or sample_size <= 0:
                return None, {}, None
            sample, counts = sample_gallery(
                gallery,
                blobs,
                loaded,
                space,
                sample_size,
                self.models.get_or_none,
                max_pixels=self.max_pixels,
                label_key=self.label_key,
            )
            if sample is None:
                return None, counts, None
            after = (
                simulate_after_transform(sample, transform.apply(sample.old), loaded)
                if transform is not None
                else None
            )
            return simulate(sample, same_space), counts, after

        key = (
            loaded.version,
            space,
            same_space,
            sample_size,
            tuple(sorted(gallery.counts_by_version().items())),
            transform.card.weights_sha256 if transform is not None else None,
        )
        simulated, counts, after = (
            self.curves.get_or_compute(key, compute) if self.curves is not None else compute()
        )
        if simulated is not None:
            method = "simulated"
            detail = (
                f"{counts.get('simulated', 0)} sampled gallery items with a kept source and a {self.label_key!r} in their "
                f"metadata: each is a query against the others (leave-one-out), the gallery mixing the "
                f"candidate's embeddings (first fraction of the policy's order) and the stored ones"
            )
            per_policy = simulated
        else:
            method = "card"
            line = card_line(
                quality.get("no_backfill"),
                quality.get("full_backfill"),
                same_space,
                quality.get("current"),
                FRACTIONS,
            )
            detail = (
                f"not enough sampled items with a kept source and a {self.label_key!r} to simulate: a straight line between "
                "the card's cells (new/old at 0%, new/new at 100%), the same for both policies"
            )
            if line is None:
                detail = (
                    "not enough labelled items with a kept source to simulate, and the card has no cells for "
                    "this gallery"
                )
            per_policy = {p: line for p in POLICIES} if line else {}
        points = {
            p: [
                {
                    "fraction": f,
                    "items": round(f * to_reembed),
                    "seconds": round(f * to_reembed / items_per_second, 2) if items_per_second > 0 else None,
                    "quality": {k: round(v, 4) for k, v in q.items()},
                }
                for f, q in zip(FRACTIONS, curve, strict=True)
            ]
            for p, curve in per_policy.items()
        }
        return {
            "method": method,
            "detail": detail,
            "sample": counts,
            "serving_during_backfill": (
                "the candidate, over the mixed gallery (same space: activate it first)"
                if same_space
                else "the current model, until every item is re-embedded (other space)"
            ),
            "fractions_of": f"the {to_reembed} items still to re-embed",
            "policies": points,
            "reaches_90pct_of_gain_at": {
                p: first_fraction_reaching(c, FRACTIONS) for p, c in per_policy.items()
            },
            "after_transform": after,
        }
