"""A small HTTP client of the graceful API, used by the demo and the benchmarks (and handy in notebooks)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from service.images import encode_png_base64
from trainer.metrics import relevance_metrics


class ApiError(RuntimeError):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


@dataclass
class HttpEval:
    """Quality measured from HTTP answers, and the versions that embedded the queries."""

    metrics: dict[str, float]
    versions: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


class GracefulClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.headers = {"X-API-Key": api_key} if api_key else {}
        self._local = threading.local()
        self.timeout = timeout

    @property
    def http(self) -> httpx.Client:
        """One connection pool per thread (httpx clients are not meant to be shared across threads)."""
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._local.client = httpx.Client(base_url=self.url, timeout=self.timeout, headers=self.headers)
        return c

    def _ok(self, r: httpx.Response) -> Any:
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ApiError(r.status_code, detail)
        return r.json()

    def get(self, path: str, **kw: Any) -> Any:
        return self._ok(self.http.get(path, **kw))

    def post(self, path: str, **kw: Any) -> Any:
        return self._ok(self.http.post(path, **kw))

    # ------------------------------------------------------------------ endpoints
    def ingest(self, ids: Sequence[str], images: np.ndarray, metadata: Sequence[dict] | None = None,
               upsert: bool = False) -> dict:
        items = [{"external_id": e, "image_base64": encode_png_base64(img), "metadata": metadata[i] if metadata else None}
                 for i, (e, img) in enumerate(zip(ids, images, strict=True))]
        return self.post("/v1/items", json={"items": items, "upsert": upsert})

    def search_image(self, image: np.ndarray, k: int = 10, include_metadata: bool = True) -> dict:
        return self.post("/v1/search", json={"image_base64": encode_png_base64(image), "k": k,
                                             "include_metadata": include_metadata})

    def activate(self, version: str) -> dict:
        return self.post(f"/v1/models/{version}/activate")

    def report(self, candidate: str) -> dict:
        return self.get("/v1/backfill/report", params={"candidate": candidate})

    # ------------------------------------------------------------------ measuring
    def ingest_all(self, ids: Sequence[str], images: np.ndarray, labels: np.ndarray, batch: int = 256,
                   upsert: bool = False, progress: Callable[[int], None] | None = None, threads: int = 2) -> None:
        """Ingest in batches from ``threads`` clients; ``progress(n)`` after each batch of n."""
        def one(s: int) -> None:
            sl = slice(s, s + batch)
            self.ingest(ids[sl], images[sl], [{"label": int(v)} for v in labels[sl]], upsert=upsert)
            if progress:
                progress(len(ids[sl]))

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(0, len(ids), batch)))

    def evaluate(self, query_images: np.ndarray, query_labels: np.ndarray, label_of: dict[str, int], k: int,
                 threads: int = 4, progress: Callable[[int], None] | None = None) -> HttpEval:
        """Top-1/top-5/mAP over the rankings the API answers (``k`` = gallery size gives the full ranking)."""
        import time

        gallery_labels = np.fromiter(label_of.values(), dtype=np.int64)
        n_rel = {int(c): int((gallery_labels == c).sum()) for c in np.unique(query_labels)}
        sums: dict[str, float] = {}
        versions: dict[str, int] = {}
        lock = threading.Lock()

        def one(i: int) -> None:
            ans = self.search_image(query_images[i], k=k, include_metadata=False)
            ranked = np.fromiter((label_of[h["external_id"]] for h in ans["hits"]), dtype=np.int64, count=len(ans["hits"]))
            rel = (ranked == query_labels[i])[None, :]
            m = relevance_metrics(rel, np.array([n_rel[int(query_labels[i])]]))
            with lock:
                for key, v in m.items():
                    sums[key] = sums.get(key, 0.0) + v
                versions[ans["model_version"]] = versions.get(ans["model_version"], 0) + 1
            if progress:
                progress(1)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(len(query_images))))
        n = len(query_images)
        return HttpEval(metrics={key: v / n for key, v in sums.items()}, versions=versions,
                        seconds=time.perf_counter() - t0)
