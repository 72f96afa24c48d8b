"""The Python client of the graceful HTTP API (used by the demo, the benchmarks and the `graceful` verbs).

Usage::

    from service.console.client import ApiError, GracefulClient

    c = GracefulClient("http://127.0.0.1:8000", api_key="...")   # the key: mutating calls only

    # ingest a folder: every PNG/JPEG/WebP file under it; the external id is the path relative to the
    # folder, without its extension, with "/" written "__" (photos/cats/tom.png -> "cats__tom")
    summary = c.ingest_folder("photos/", metadata={"source": "camera"}, batch=64)
    print(summary.stored, summary.failed)

    # search: by image (a file path, bytes, a PIL image, or a uint8 array (H, W) or (C, H, W)), by vector
    # (with the version that embedded it) or by a stored item; filters on top-level metadata keys
    c.search("query.png", k=5)["hits"]
    c.search(query_array, k=10, filter={"label": 3, "color": {"in": ["red", "blue"]}})
    c.search(vector=[0.1, ...], model_version="v1", k=10)
    c.search(item_id="cats__tom", k=10)
    c.search_many(["a.png", "b.png", {"item_id": "cats__tom"}], k=5)   # one request per 64 searches

    # items
    c.get_items(["cats__tom", "nope"])         # {"items": [...], "missing": ["nope"]}
    for item in c.scroll(limit=500): ...        # every item, in external-id order
    c.patch_metadata("cats__tom", {"reviewed": True, "draft": None})   # None removes a key
    c.delete(["cats__tom"])                     # {"deleted": [...], "missing": [...]}

    # a seeded sample of the gallery's kept source images, into a folder (for `graceful train --unlabeled`)
    c.export_sources("unlabeled/", sample=5000, seed=0)     # ExportSummary: .written, .without_source

    # models and backfill
    c.models(); c.active(); c.check("v2"); c.activate("v2"); c.rollback()
    job = c.backfill_start("v2", policy="uncertainty")
    job = c.backfill_wait(job["id"], progress=True)

Errors: an HTTP error answer raises :class:`ApiError` (``.status``, ``.detail``, the server's message). A
503 (the server could not start the request: overloaded, no model yet, stopping) and a failure to connect
are retried with exponential backoff, ``retries`` times at most (0: never), honouring ``Retry-After``; no
other status is retried (a 4xx will not change, and a 500 or 504 may have done part of its work). Other
transport errors are retried only for GET requests, which change nothing.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import numpy as np

from service.images import encode_png, encode_png_base64
from trainer.metrics import relevance_metrics

__all__ = [
    "IMAGE_SUFFIXES",
    "ApiError",
    "DestinationNotEmpty",
    "ExportSummary",
    "GracefulClient",
    "HttpEval",
    "IngestSummary",
    "encode_image",
    "external_id_for",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
"""File types :meth:`GracefulClient.ingest_folder` picks up (WebP is converted to PNG: the server reads PNG
and JPEG)."""

MAX_BATCH_SEARCHES = 64  # the server's bound on POST /v1/search/batch
_SEPARATOR = "__"  # "/" in a relative path becomes this: external ids may not contain "/"
_RETRY_STATUS = 503
_REFUSED = (409, 413, 422)  # what the server answers for a bad item (ingest_folder isolates and reports it)
_EXPORT_PATH = "/v1/gallery/sources/export"
# the only member names an export is unpacked under: one plain name, no folder, no leading dot (no "..")
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


class ApiError(RuntimeError):
    """An HTTP error answer: ``status`` and the server's ``detail`` message."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


@dataclass
class HttpEval:
    """Quality measured from HTTP answers, and the versions that embedded the queries."""

    metrics: dict[str, float]
    versions: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    # (Q,) bool: whether each query's top-1 hit had its class, in the order of the queries (retrieval flips)
    top1_hits: np.ndarray | None = None


@dataclass
class IngestSummary:
    """What :meth:`GracefulClient.ingest_folder` did: ids stored, ``(file, reason)`` of the files refused."""

    files: int = 0
    stored: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def line(self) -> str:
        """One summary line: ``ingested 120 of 122 files in 3.4s (35/s) by v1; 2 failed``."""
        rate = len(self.stored) / self.seconds if self.seconds > 0 else 0.0
        if len(self.versions) == 1:
            by = next(iter(self.versions))
        else:
            by = ", ".join(f"{v} ({n})" for v, n in sorted(self.versions.items()))
        text = f"ingested {len(self.stored)} of {self.files} files in {self.seconds:.1f}s ({rate:.0f}/s)"
        text += f" by {by}" if by else ""
        return text + (f"; {len(self.failed)} failed" if self.failed else "")


class DestinationNotEmpty(Exception):
    """:meth:`GracefulClient.export_sources` into a folder that already holds something (without ``force``)."""


@dataclass
class ExportSummary:
    """What :meth:`GracefulClient.export_sources` wrote into ``dest``: the image files' names, the items
    skipped (no kept source, or missing from the server's store), archive members refused for their name,
    the archive's size in bytes, and the server's manifest (also written as ``dest/manifest.json``)."""

    dest: Path
    written: list[str] = field(default_factory=list)
    without_source: int = 0
    missing_from_store: int = 0
    refused: list[str] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    manifest: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        """One line: ``exported 120 files (3.4 MB) into DIR in 1.2s (seed 0); 5 skipped without a source``."""
        text = (
            f"exported {len(self.written)} files ({self.bytes / 1e6:.1f} MB) into {self.dest} in "
            f"{self.seconds:.1f}s (seed {self.manifest.get('seed', '?')})"
        )
        skipped = [f"{self.without_source} skipped without a kept source"] if self.without_source else []
        if self.missing_from_store:
            skipped.append(f"{self.missing_from_store} missing from the server's blob store")
        if self.refused:
            skipped.append(f"{len(self.refused)} archive entries refused for their name")
        return text + ("; " + ", ".join(skipped) if skipped else "")


ImageLike = Any  # str | os.PathLike | bytes | PIL.Image.Image | np.ndarray


def encode_image(image: ImageLike) -> bytes:
    """PNG or JPEG bytes of ``image`` to send: a file path (its bytes; other formats, e.g. WebP, converted to
    PNG), bytes (sent as they are if PNG/JPEG, else converted), a PIL image, or a uint8 array (H, W),
    (C, H, W) with C = 1 or 3, or (H, W, 3)."""
    if isinstance(image, str | os.PathLike):
        return encode_image(Path(image).read_bytes())
    if isinstance(image, bytes | bytearray | memoryview):
        raw = bytes(image)
        if raw.startswith(_PNG_MAGIC) or raw.startswith(_JPEG_MAGIC):
            return raw
        from PIL import Image

        with Image.open(io.BytesIO(raw)) as im:
            return encode_image(im)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"an image array must be uint8, not {image.dtype}")
        if image.ndim == 3 and image.shape[-1] == 3 and image.shape[0] not in (1, 3):
            image = image.transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[0] not in (1, 3)):
            raise ValueError(f"an image array must be (H, W), (C, H, W) or (H, W, 3), not {image.shape}")
        return encode_png(image)
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image
        buf = io.BytesIO()
        im = image if image.mode in ("L", "RGB", "RGBA", "LA") else image.convert("RGB")
        if im.mode in ("RGBA", "LA"):
            im = im.convert("RGB" if im.mode == "RGBA" else "L")
        im.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(
        f"cannot send a {type(image).__name__} as an image: give a path, bytes, a PIL image or an array"
    )


def _b64(image: ImageLike) -> str:
    return base64.b64encode(encode_image(image)).decode("ascii")


def external_id_for(path: Path, root: Path) -> str:
    """The external id :meth:`GracefulClient.ingest_folder` gives a file: its path relative to ``root``,
    without the extension, folders joined with ``__`` (external ids may not contain ``/``)."""
    rel = path.relative_to(root).with_suffix("")
    return _SEPARATOR.join(rel.parts)


def image_files(paths: Iterable[str | os.PathLike[str]]) -> list[tuple[Path, str]]:
    """``(file, external id)`` of every image file among ``paths``: a folder gives its image files (any
    depth, sorted), ids relative to it; a file gives itself, its id its name without the extension.
    A missing path raises FileNotFoundError."""
    out: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            out += [(f, external_id_for(f, p)) for f in found]
        elif p.is_file():
            out.append((p, p.stem))
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return out


class GracefulClient:
    """A client of one graceful server. Thread-safe (one connection pool per thread).

    ``api_key`` goes in ``X-API-Key`` (needed by mutating calls when the server has one). ``retries``:
    how many times a 503 or a failed connection is retried (exponential backoff from ``backoff`` seconds,
    at most ``max_backoff``); 0 never retries. ``http_client``: an ``httpx.Client`` to send everything
    through (tests pass an in-process app's TestClient); by default each thread opens its own to ``url``.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout: float = 120.0,
        *,
        retries: int = 4,
        backoff: float = 0.25,
        max_backoff: float = 8.0,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.headers = {"X-API-Key": api_key} if api_key else {}
        self._local = threading.local()
        self._shared = http_client  # e.g. a TestClient of an in-process app; used by every thread
        self.timeout = timeout
        if retries < 0 or backoff < 0 or max_backoff < 0:
            raise ValueError("retries, backoff and max_backoff must be >= 0")
        self.retries, self.backoff, self.max_backoff = int(retries), float(backoff), float(max_backoff)
        self.sleep: Callable[[float], None] = time.sleep  # (tests replace it)

    @property
    def http(self) -> httpx.Client:
        """One connection pool per thread (httpx clients are not meant to be shared across threads), or
        the ``http_client`` given."""
        if self._shared is not None:
            return self._shared
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._local.client = httpx.Client(
                base_url=self.url, timeout=self.timeout, headers=self.headers
            )
        return c

    def _ok(self, r: httpx.Response) -> Any:
        if r.status_code >= 400:
            try:
                body = r.json()
                detail = body.get("detail", r.text) if isinstance(body, dict) else r.text
            except ValueError:
                detail = r.text
            raise ApiError(r.status_code, str(detail))
        return r.json()

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        delay = min(self.max_backoff, self.backoff * (2**attempt))
        if response is not None:
            with contextlib.suppress(ValueError):  # Retry-After as seconds (an HTTP date is ignored)
                delay = min(self.max_backoff, max(delay, float(response.headers.get("retry-after", ""))))
        return delay

    def request(self, method: str, path: str, **kw: Any) -> Any:
        """Send one request (retrying as the class says) and return its JSON answer; :class:`ApiError` for
        an HTTP error, ``httpx.HTTPError`` when the server cannot be reached after the retries."""
        attempt = 0
        while True:
            try:
                r = self.http.request(
                    method, path, **{**kw, "headers": {**self.headers, **(kw.get("headers") or {})}}
                )
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout):
                if attempt >= self.retries:
                    raise
                self.sleep(self._delay(attempt, None))
            except httpx.TransportError:
                if method.upper() != "GET" or attempt >= self.retries:
                    raise
                self.sleep(self._delay(attempt, None))
            else:
                if r.status_code != _RETRY_STATUS or attempt >= self.retries:
                    return self._ok(r)
                self.sleep(self._delay(attempt, r))
            attempt += 1

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Any:
        return self.request("POST", path, **kw)

    # ------------------------------------------------------------------ ingest
    def ingest(
        self,
        ids: Sequence[str],
        images: np.ndarray,
        metadata: Sequence[dict] | None = None,
        upsert: bool = False,
    ) -> dict:
        """Ingest images (uint8 arrays) under ``ids`` in one request (all-or-nothing)."""
        items = [
            {
                "external_id": e,
                "image_base64": encode_png_base64(img),
                "metadata": metadata[i] if metadata else None,
            }
            for i, (e, img) in enumerate(zip(ids, images, strict=True))
        ]
        return self.post("/v1/items", json={"items": items, "upsert": upsert})

    def ingest_vectors(
        self,
        ids: Sequence[str],
        vectors: np.ndarray | Sequence[Sequence[float]],
        model_version: str,
        metadata: Sequence[dict | None] | None = None,
        upsert: bool = False,
        batch_size: int = 1024,
    ) -> dict:
        """Ingest embeddings computed outside graceful ((n, d) floats, made by ``model_version``: the active
        version or another of the gallery's space) under ``ids``, ``batch_size`` per request (each request
        all-or-nothing; GRACEFUL_MAX_BATCH_ITEMS on the server bounds it). Returns ``{"model_version",
        "space", "stored", "count"}`` over every request."""
        rows = np.asarray(vectors, dtype=np.float64)
        if rows.ndim != 2 or len(rows) != len(ids):
            raise ValueError(f"vectors must be (len(ids)={len(ids)}, d), got shape {rows.shape}")
        if metadata is not None and len(metadata) != len(ids):
            raise ValueError(f"{len(metadata)} metadata for {len(ids)} ids: give one per id or none")
        out: dict[str, Any] = {"model_version": model_version, "space": None, "stored": [], "count": 0}
        for s in range(0, len(ids), max(1, int(batch_size))):
            items = [
                {
                    "external_id": ids[i],
                    "vector": rows[i].tolist(),
                    "model_version": model_version,
                    "metadata": metadata[i] if metadata else None,
                }
                for i in range(s, min(s + batch_size, len(ids)))
            ]
            answer = self.post("/v1/items", json={"items": items, "upsert": upsert})
            out["space"] = answer["space"]
            out["stored"] += answer["stored"]
            out["count"] += answer["count"]
        return out

    def ingest_images(
        self,
        ids: Sequence[str],
        images: Sequence[ImageLike],
        metadata: Sequence[dict | None] | None = None,
        upsert: bool = False,
    ) -> dict:
        """Like :meth:`ingest` for any image-like values (paths, bytes, PIL images, arrays)."""
        items = [
            {"external_id": e, "image_base64": _b64(img), "metadata": metadata[i] if metadata else None}
            for i, (e, img) in enumerate(zip(ids, images, strict=True))
        ]
        return self.post("/v1/items", json={"items": items, "upsert": upsert})

    def ingest_folder(
        self,
        path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        metadata: Mapping[str, Any] | Callable[[Path], dict | None] | None = None,
        batch: int = 64,
        upsert: bool = False,
        progress: bool = True,
    ) -> IngestSummary:
        """Ingest every PNG/JPEG/WebP file under a folder (or given files), ``batch`` per request, with a
        progress bar (``progress``). External ids: :func:`external_id_for`. ``metadata``: the same dict for
        every file, or a function of the file's path. A batch the server refuses (a bad image, an id
        already stored without ``upsert``) is sent again file by file, so one bad file fails alone;
        ``summary.failed`` says why each failed. Connection problems and other server errors raise."""
        started = time.perf_counter()
        paths = [path] if isinstance(path, str | os.PathLike) else list(path)
        files = image_files(paths)
        summary = IngestSummary(files=len(files))
        seen: dict[str, Path] = {}
        todo: list[tuple[Path, str]] = []
        for f, eid in files:
            if eid in seen:
                summary.failed.append((str(f), f"external id {eid!r} is also the id of {seen[eid]}"))
            else:
                seen[eid] = f
                todo.append((f, eid))

        def meta_of(f: Path) -> dict | None:
            if metadata is None:
                return None
            return metadata(f) if callable(metadata) else dict(metadata)

        def send(chunk: list[tuple[Path, str]]) -> None:
            items: list[dict[str, Any]] = []
            for f, eid in chunk:
                try:
                    items.append({"external_id": eid, "image_base64": _b64(f), "metadata": meta_of(f)})
                except Exception as e:  # unreadable file, not an image PIL knows
                    summary.failed.append((str(f), f"cannot read the image: {e}"))
            if not items:
                return
            try:
                _count(self.post("/v1/items", json={"items": items, "upsert": upsert}))
                return
            except ApiError as e:
                if e.status not in _REFUSED:
                    raise
                if len(items) == 1:
                    summary.failed.append((str(seen[items[0]["external_id"]]), e.detail))
                    return
            for it in items:  # the batch was refused as a whole: find the bad files, store the others
                try:
                    _count(self.post("/v1/items", json={"items": [it], "upsert": upsert}))
                except ApiError as e:
                    if e.status not in _REFUSED:
                        raise
                    summary.failed.append((str(seen[it["external_id"]]), e.detail))

        def _count(answer: dict) -> None:
            summary.stored += answer["stored"]
            v = answer["model_version"]
            summary.versions[v] = summary.versions.get(v, 0) + len(answer["stored"])

        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(files), desc="ingest", unit="img", dynamic_ncols=True)
            bar.update(len(files) - len(todo))
        try:
            for s in range(0, len(todo), max(1, batch)):
                chunk = todo[s : s + max(1, batch)]
                send(chunk)
                if bar is not None:
                    bar.update(len(chunk))
                    bar.set_postfix_str(
                        f"{len(summary.failed)} failed" if summary.failed else "", refresh=False
                    )
        finally:
            if bar is not None:
                bar.close()
        summary.seconds = time.perf_counter() - started
        return summary

    # ------------------------------------------------------------------ search
    @staticmethod
    def search_body(
        image: ImageLike = None,
        *,
        vector: Sequence[float] | np.ndarray | None = None,
        model_version: str | None = None,
        item_id: str | None = None,
        k: int = 10,
        filter: Mapping[str, Any] | None = None,
        include_metadata: bool = True,
    ) -> dict:  # noqa: A002
        """The JSON body of one search (what :meth:`search` sends)."""
        given = sum(x is not None for x in (image, vector, item_id))
        if given != 1:
            raise ValueError("give exactly one of an image, vector= (with model_version=) or item_id=")
        body: dict[str, Any] = {"k": int(k), "include_metadata": include_metadata}
        if image is not None:
            body["image_base64"] = _b64(image)
        elif vector is not None:
            if model_version is None:
                raise ValueError("a vector needs model_version=: the version that embedded it")
            body["vector"] = [float(x) for x in np.asarray(vector, dtype=np.float64).ravel()]
        else:
            body["item_id"] = item_id
        if model_version is not None:
            body["model_version"] = model_version
        if filter:
            body["filter"] = dict(filter)
        return body

    def search(
        self,
        image: ImageLike = None,
        *,
        vector: Sequence[float] | np.ndarray | None = None,
        model_version: str | None = None,
        item_id: str | None = None,
        k: int = 10,
        filter: Mapping[str, Any] | None = None,
        include_metadata: bool = True,
    ) -> dict:  # noqa: A002
        """One search: by ``image`` (a path, bytes, PIL image or uint8 array), by ``vector`` with
        ``model_version``, or by ``item_id``; ``filter`` on metadata (``{"key": value}``, ``{"key": {"in":
        [...]}}``). Returns ``{"model_version", "space", "hits": [{"external_id", "score", "embedded_by",
        "metadata"}]}``."""
        return self.post(
            "/v1/search",
            json=self.search_body(
                image,
                vector=vector,
                model_version=model_version,
                item_id=item_id,
                k=k,
                filter=filter,
                include_metadata=include_metadata,
            ),
        )

    def search_many(
        self,
        searches: Sequence[ImageLike | Mapping[str, Any]],
        *,
        k: int = 10,
        filter: Mapping[str, Any] | None = None,
        include_metadata: bool = True,
    ) -> list[dict]:  # noqa: A002
        """Several searches through ``POST /v1/search/batch`` (64 per request), answers in order. Each entry
        is an image-like, or a dict of :meth:`search`'s keywords (``{"item_id": ..., "k": 3}``, ``{"image":
        ..., "filter": ...}``); ``k``, ``filter`` and ``include_metadata`` are the defaults of the entries."""
        bodies = []
        for s in searches:
            if isinstance(s, Mapping):
                kw = {"k": k, "filter": filter, "include_metadata": include_metadata, **s}
                bodies.append(self.search_body(kw.pop("image", None), **kw))
            else:
                bodies.append(self.search_body(s, k=k, filter=filter, include_metadata=include_metadata))
        out: list[dict] = []
        for s in range(0, len(bodies), MAX_BATCH_SEARCHES):
            out += self.post("/v1/search/batch", json={"searches": bodies[s : s + MAX_BATCH_SEARCHES]})[
                "results"
            ]
        return out

    def search_image(self, image: np.ndarray, k: int = 10, include_metadata: bool = True) -> dict:
        return self.post(
            "/v1/search",
            json={"image_base64": encode_png_base64(image), "k": k, "include_metadata": include_metadata},
        )

    # ------------------------------------------------------------------ items
    def get_item(self, external_id: str) -> dict:
        return self.get(f"/v1/items/{_quote(external_id)}")

    def get_items(self, external_ids: Sequence[str]) -> dict:
        """``{"items": [...found, in order], "missing": [ids]}`` (1000 ids per request)."""
        items: list[dict] = []
        missing: list[str] = []
        ids = list(external_ids)
        for s in range(0, len(ids), 1000):
            got = self.post("/v1/items/get", json={"external_ids": ids[s : s + 1000]})
            items += got["items"]
            missing += got["missing"]
        return {"items": items, "missing": missing}

    def delete(self, external_ids: Sequence[str] | str) -> dict:
        """Delete items: ``{"deleted": [ids], "missing": [ids]}`` (1000 ids per request, each request one
        transaction)."""
        ids = [external_ids] if isinstance(external_ids, str) else list(external_ids)
        deleted: list[str] = []
        missing: list[str] = []
        for s in range(0, len(ids), 1000):
            got = self.post("/v1/items/delete", json={"external_ids": ids[s : s + 1000]})
            deleted += got["deleted"]
            missing += got["missing"]
        return {"deleted": deleted, "missing": missing}

    def scroll(self, limit: int = 100, after: str | None = None) -> Iterator[dict]:
        """Every item (after ``after``), in external-id order, ``limit`` per request."""
        while True:
            page = self.get("/v1/items", params={"limit": limit, **({"after": after} if after else {})})
            yield from page["items"]
            after = page["next"]
            if after is None:
                return

    def patch_metadata(
        self, external_id: str, metadata: Mapping[str, Any] | None, merge: bool = True
    ) -> dict:
        """Change an item's metadata: merge (a None value removes its key) or replace; returns the item."""
        return self.request(
            "PATCH",
            f"/v1/items/{_quote(external_id)}",
            json={"metadata": None if metadata is None else dict(metadata), "merge": merge},
        )

    # ------------------------------------------------------------------ export
    def export_sources(
        self,
        dest_dir: str | os.PathLike[str],
        sample: int,
        seed: int = 0,
        *,
        force: bool = False,
        progress: bool = True,
    ) -> ExportSummary:
        """Download a seeded sample of ``sample`` items' kept source images (``GET
        /v1/gallery/sources/export``: the same seed over the same items gives the same files) and unpack it
        into ``dest_dir`` (made if missing) as ``<item_id>.<png|jpg|webp|bin>`` plus ``manifest.json``.
        A progress bar in bytes while downloading (``progress``).

        :class:`DestinationNotEmpty` when ``dest_dir`` exists and holds anything (checked before
        downloading; ``force`` writes into it anyway, replacing files of the same names). Only members with
        a plain file name are written (no folders, no ``..``): others are listed in ``refused``.
        :class:`ApiError` for an HTTP error answer (nothing is written then)."""
        started = time.perf_counter()
        dest = Path(dest_dir)
        if dest.exists() and not dest.is_dir():
            raise DestinationNotEmpty(f"{dest} exists and is not a folder")
        if not force and dest.is_dir() and any(dest.iterdir()):
            raise DestinationNotEmpty(f"{dest} is not empty (use --force to write into it anyway)")
        summary = ExportSummary(dest=dest)
        params = {"sample": int(sample), "seed": int(seed)}
        with tempfile.TemporaryFile() as archive:  # on disk: an export may be larger than memory allows
            summary.bytes = self._download(_EXPORT_PATH, params, archive, progress)
            archive.seek(0)
            dest.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    if info.is_dir() or not _PLAIN_NAME.match(info.filename):
                        summary.refused.append(info.filename)
                        continue
                    target = dest / info.filename
                    if target.is_symlink() or target.exists():
                        target.unlink()  # (force) replace, never write through a link left in the folder
                    with zf.open(info) as src, open(target, "xb") as out:
                        shutil.copyfileobj(src, out, 1024 * 1024)
                    if info.filename == "manifest.json":
                        with contextlib.suppress(ValueError):
                            summary.manifest = json.loads(target.read_text(encoding="utf-8"))
                    else:
                        summary.written.append(info.filename)
        m = summary.manifest
        summary.without_source = int(m.get("without_source", 0))
        summary.missing_from_store = int(m.get("missing_from_store", 0))
        summary.seconds = time.perf_counter() - started
        return summary

    def _download(self, path: str, params: Mapping[str, Any], out: IO[bytes], progress: bool) -> int:
        """Stream a GET answer's body into ``out`` (retrying as :meth:`request` does a GET, from the start);
        returns its size in bytes. :class:`ApiError` for an HTTP error answer."""
        attempt = 0
        while True:
            delay: float | None = None
            try:
                with self.http.stream("GET", path, params=params, headers=self.headers) as r:
                    if r.status_code == _RETRY_STATUS and attempt < self.retries:
                        delay = self._delay(attempt, r)
                    elif r.status_code >= 400:
                        r.read()
                        self._ok(r)  # raises ApiError with the server's detail
                    else:
                        return self._save_body(r, out, progress)
            except httpx.TransportError:  # a GET changes nothing: retried, from the first byte again
                if attempt >= self.retries:
                    raise
                delay = self._delay(attempt, None)
            out.seek(0)
            out.truncate()
            self.sleep(delay or 0.0)
            attempt += 1

    @staticmethod
    def _save_body(r: httpx.Response, out: IO[bytes], progress: bool) -> int:
        total = int(r.headers.get("content-length", 0)) or None
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(
                total=total, desc="export", unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True
            )
        size = 0
        try:
            for chunk in r.iter_bytes(1024 * 1024):
                out.write(chunk)
                size += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        return size

    # ------------------------------------------------------------------ models
    def models(self) -> dict:
        """``{"active": version, "models": [...]}``: every version folder the server sees."""
        return self.get("/v1/models")

    def active(self) -> dict:
        """The active model: version, space, activated_at, card."""
        return self.get("/v1/models/active")

    def activate(self, version: str, force: bool = False) -> dict:
        """Hot-swap to ``version`` (409 when its space or its measured check refuses it; ``force`` overrides a
        failed check, and the override is recorded)."""
        return self.post(f"/v1/models/{version}/activate", params={"force": "true"} if force else None)

    def check(self, version: str) -> dict:
        """The compatibility check of ``version`` against the gallery as stored (what activation measures)."""
        return self.post(f"/v1/models/{version}/check")

    def rollback(self) -> dict:
        return self.post("/v1/models/rollback")

    def report(self, candidate: str, workers: int | None = None) -> dict:
        """The backfill-cost report; ``workers``: predicted for that many workers (single-worker rate x N)."""
        params: dict[str, str | int] = {"candidate": candidate}
        if workers is not None:
            params["workers"] = int(workers)
        return self.get("/v1/backfill/report", params=params)

    # ------------------------------------------------------------------ backfill
    def backfill_start(
        self,
        candidate: str,
        *,
        policy: str | None = None,
        rate_limit: float | None = None,
        batch_size: int | None = None,
        stop_at: float | None = None,
        engine: str | None = None,
        address: str | None = None,
        workers: int | None = None,
        kind: str | None = None,
        source: str | None = None,
    ) -> dict:
        """Start re-embedding the gallery with ``candidate``; returns the job (``id``, ``status``, ...).
        ``engine="ray"`` embeds on a Ray cluster (``address``; unset: a local one) with ``workers`` actors.
        ``kind="transform"`` maps the stored vectors of ``source`` (unset: the active version) into the
        candidate's space instead, reading no image."""
        body = {
            "candidate": candidate,
            "kind": kind,
            "source": source,
            "policy": policy,
            "rate_limit": rate_limit,
            "batch_size": batch_size,
            "stop_at": stop_at,
            "engine": engine,
            "address": address,
            "workers": workers,
        }
        return self.post("/v1/backfill", json={k: v for k, v in body.items() if v is not None})

    def backfill_status(self, job_id: int) -> dict:
        return self.get(f"/v1/backfill/{int(job_id)}")

    def backfill_wait(
        self, job_id: int, progress: bool = True, poll: float = 0.5, timeout: float | None = None
    ) -> dict:
        """Poll a job until it stops running (done, paused, cancelled, failed); a progress bar meanwhile.
        Returns the last state; TimeoutError after ``timeout`` seconds (None: no limit)."""
        job = self.backfill_status(job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(
                total=job["total"],
                initial=job["done"],
                desc=f"backfill {job['candidate']}",
                unit="item",
                dynamic_ncols=True,
            )
        try:
            while job["status"] in ("pending", "running"):
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"backfill job {job_id} still {job['status']} after {timeout}s")
                self.sleep(poll)
                job = self.backfill_status(job_id)
                if bar is not None:
                    bar.total = job["total"]
                    bar.update(job["done"] + job.get("skipped", 0) - bar.n)
        finally:
            if bar is not None:
                bar.close()
        return job

    # ------------------------------------------------------------------ measuring
    def ingest_all(
        self,
        ids: Sequence[str],
        images: np.ndarray,
        labels: np.ndarray,
        batch: int = 256,
        upsert: bool = False,
        progress: Callable[[int], None] | None = None,
        threads: int = 2,
    ) -> None:
        """Ingest in batches from ``threads`` clients; ``progress(n)`` after each batch of n."""

        def one(s: int) -> None:
            sl = slice(s, s + batch)
            self.ingest(ids[sl], images[sl], [{"label": int(v)} for v in labels[sl]], upsert=upsert)
            if progress:
                progress(len(ids[sl]))

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(0, len(ids), batch)))

    def evaluate(
        self,
        query_images: np.ndarray,
        query_labels: np.ndarray,
        label_of: dict[str, int],
        k: int,
        threads: int = 4,
        progress: Callable[[int], None] | None = None,
    ) -> HttpEval:
        """Top-1/top-5/mAP over the rankings the API answers (``k`` = gallery size gives the full ranking)."""
        gallery_labels = np.fromiter(label_of.values(), dtype=np.int64)
        n_rel = {int(c): int((gallery_labels == c).sum()) for c in np.unique(query_labels)}
        sums: dict[str, float] = {}
        versions: dict[str, int] = {}
        hits = np.zeros(len(query_images), dtype=bool)
        lock = threading.Lock()

        def one(i: int) -> None:
            ans = self.search_image(query_images[i], k=k, include_metadata=False)
            ranked = np.fromiter(
                (label_of[h["external_id"]] for h in ans["hits"]), dtype=np.int64, count=len(ans["hits"])
            )
            rel = (ranked == query_labels[i])[None, :]
            m = relevance_metrics(rel, np.array([n_rel[int(query_labels[i])]]))
            hits[i] = bool(rel[0, :1].any())
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
        return HttpEval(
            metrics={key: v / n for key, v in sums.items()},
            versions=versions,
            seconds=time.perf_counter() - t0,
            top1_hits=hits,
        )


def _quote(external_id: str) -> str:
    from urllib.parse import quote

    return quote(external_id, safe="")
