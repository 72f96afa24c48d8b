"""The backfill-cost report: what re-embedding the gallery with a candidate would cost, and what it buys.

Throughput is measured, not assumed: a short timed batch through the same path a backfill takes (decode a
PNG, embed), on this machine, cached per version. Quality comes from the candidate's card (its measured
compatibility matrix against its parent): no backfill = candidate queries over the gallery's current
embeddings, full backfill = candidate over candidate.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.images import decode_image, encode_png
from service.registry import ModelRegistry, backfill_report_url
from trainer.artifact import LoadedModel, embed_images, load_model

QUALITY_KEYS = ("top1", "top5", "mAP")


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
            pngs = [encode_png(rng.integers(0, 256, (prep.channels, prep.size, prep.size), dtype=np.uint8))
                    for _ in range(min(self.n_images, 64))]
            embed_images(loaded, np.zeros((8, prep.channels, prep.size, prep.size), np.uint8))  # warm
            t0 = time.perf_counter()
            done = 0
            while done < self.n_images:
                n = min(self.batch_size, self.n_images - done)
                batch = np.stack([decode_image(pngs[(done + i) % len(pngs)], channels=prep.channels, size=prep.size,
                                               max_pixels=1 << 30, what="probe") for i in range(n)])
                embed_images(loaded, batch)
                done += n
            seconds = time.perf_counter() - t0
            tp = Throughput(images_per_second=done / seconds, batch=self.batch_size, seconds=seconds,
                            threads=self.threads, measured_at=time.time())
            self._cache[loaded.version] = tp
            return tp


def _quality(matrix: dict[str, Any], key: str) -> dict[str, float] | None:
    cell = matrix.get(key)
    return {k: cell[k] for k in QUALITY_KEYS if k in cell} if cell else None


def backfill_report(registry: ModelRegistry, probe: ThroughputProbe, candidate: str, price_per_cpu_hour: float) -> dict:
    """The report of DESIGN.md for ``candidate`` (a registered, valid version)."""
    entry = registry.entry(candidate)
    card = entry.card
    assert card is not None
    gallery = registry.gallery
    total = gallery.count()
    by_version = gallery.counts_by_version()
    in_space = gallery.count(card.space) if card.space in gallery.spaces() else 0
    done, _ = gallery.backfill_progress(candidate)
    to_reembed = total - done
    problem = registry.gallery_space_problem(card)

    active = registry.active
    loaded = active.loaded if active and active.version == candidate else load_model(entry.path)
    tp = probe.measure(loaded)
    seconds = to_reembed / tp.images_per_second if tp.images_per_second > 0 else float("inf")
    cpu_hours = seconds * tp.threads / 3600.0

    # Which version's embeddings a no-backfill search would meet: the one holding most items of the space.
    space_versions = {v: n for v, n in by_version.items()
                      if n and v in {x.version for x in gallery.list_versions() if x.space == card.space}}
    gallery_version = max(space_versions, key=lambda v: space_versions[v]) if space_versions else None
    matrix = card.metrics.get("matrix", {}) if card.metrics else {}
    quality = {
        "source": f"model card of {candidate} (test split of its training data)",
        "current": _quality(matrix, f"{gallery_version}/{gallery_version}") if gallery_version else None,
        "no_backfill": None if problem else (
            _quality(matrix, f"{candidate}/{gallery_version}") if gallery_version else None),
        "full_backfill": _quality(matrix, f"{candidate}/{candidate}"),
    }
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
            "measured_images": probe.n_images,
            "threads": tp.threads,
            "what": f"decode PNG + embed, batches of {tp.batch}, on this machine",
        },
        "predicted": {
            "wall_seconds": round(seconds, 2),
            "wall_hours": round(seconds / 3600.0, 4),
            "cpu_hours": round(cpu_hours, 4),
            "cost": round(cpu_hours * price_per_cpu_hour, 4),
            "price_per_cpu_hour": price_per_cpu_hour,
            "currency": "USD",
        },
        "quality": quality,
        "report_url": backfill_report_url(candidate),
    }
