"""Backfill runners built from the parts in-process (no HTTP): a gallery of the tiny test images embedded by
v1 with kept sources, and helpers to wait for a job and read what it wrote."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from index import Gallery, NewItem
from index.tables import VEC_ID_COUNTER, Counter
from service.backfill.runner import BackfillRunner
from service.blobs import BlobStore
from service.images import encode_png
from service.models.cache import ModelCache
from service.models.hot_swap import HotSwap
from service.models.registry import ModelRegistry
from trainer.data import Dataset


@dataclass
class Parts:
    gallery: Gallery
    swap: HotSwap
    models: ModelCache
    blobs: BlobStore

    def runner(self, **kwargs: Any) -> BackfillRunner:
        kwargs.setdefault("idle_poll_s", 0.1)
        return BackfillRunner(self.gallery, self.swap, self.models, self.blobs, **kwargs)


def open_parts(models_src: Path, root: Path, db_url: str | None = None, data: str = "data") -> Parts:
    """Parts over ``root`` (models copied there once, blobs shared under it) and the database ``db_url``
    (None: SQLite under ``root/data``); ``data`` names this process's own data dir (FAISS snapshots)."""
    if not (root / "models").exists():
        shutil.copytree(models_src, root / "models")
    gallery = Gallery.open(db_url, root / data)
    registry = ModelRegistry(root / "models", gallery)
    registry.scan()
    models = ModelCache(registry)
    swap = HotSwap(registry, models)
    swap.activate("v1")
    return Parts(gallery, swap, models, BlobStore(root / "blobs"))


def ingest(parts: Parts, ds: Dataset, indices) -> list[str]:
    """Items ``g{i}`` embedded by v1, sources kept; returns their external ids."""
    vecs = parts.swap.active.embed(ds.images[indices])
    items = [
        NewItem(
            f"g{i}",
            v,
            metadata={"label": int(ds.labels[i])},
            source_uri=parts.blobs.put(encode_png(ds.images[i])),
        )
        for i, v in zip(indices, vecs, strict=True)
    ]
    parts.gallery.add(items, "v1")
    return [it.external_id for it in items]


def wait_status(
    runner: BackfillRunner, job_id: int, statuses: tuple[str, ...], timeout: float = 120.0
) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = runner.describe(job_id)
        if job["status"] in statuses:
            return job
        assert job["status"] != "failed", job
        assert time.monotonic() < deadline, f"timed out waiting for {statuses}: {job}"
        time.sleep(0.05)


def vec_id_counter(gallery: Gallery) -> int:
    with gallery.engine.connect() as conn:
        return int(conn.execute(select(Counter.value).where(Counter.name == VEC_ID_COUNTER)).scalar_one())
