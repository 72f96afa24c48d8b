"""Service benchmark: quality over HTTP vs the trainer's matrix, latency and throughput vs in-process
(micro-batched and not), thread settings, ingest throughput, a 1e6-item gallery on a background-built IVF
index (QPS, recall@10 vs exact), activation time at 1e4 vs 1e6 items, and the backfill report's prediction
vs a measured re-embed.

    .venv/bin/python -m bench.service            # full protocol; writes "## Service" in BENCHMARKS.md
    .venv/bin/python -m bench.service --quick    # smaller; prints only

Models: ``--models DIR`` if given, else v1 and v2 (BCT) of bench/compat.py's seed 0 when present
(bench/out/compat/full/seed0), else trained here with the same defaults. Everything runs on this machine: one server process on 127.0.0.1, clients in
this process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from bench.common import REPO, command_line, machine_line, v1_v2_models, write_section
from service.console.client import GracefulClient
from service.console.local_server import LocalServer
from service.images import decode_image, encode_png, encode_png_base64
from trainer.artifact import embed_images, load_model
from trainer.data import load_split, query_gallery_split
from trainer.evaluate import evaluate_models

KEY = "bench-key"


def models_dir(args) -> Path:
    if getattr(args, "models", None):
        return Path(args.models).resolve()
    return v1_v2_models("service", args.quick)


def percentile(xs: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(xs), p))


def load_test(client: GracefulClient, payloads: list[dict], concurrency: int, n: int) -> dict:
    """``n`` image searches from ``concurrency`` client threads; per-request latency and overall QPS."""
    import json

    return load_test_urls([client.url], [json.dumps(p).encode() for p in payloads], concurrency, n)


def load_test_urls(urls: list[str], bodies: list[bytes], concurrency: int, n: int) -> dict:
    """``n`` searches (JSON ``bodies``, cycled) from ``concurrency`` client threads, thread i speaking to
    ``urls[i % len(urls)]``; per-request latency and overall QPS.

    The clients are lean on purpose (they share the 2 cores with the server): request bodies are encoded
    once, each thread keeps one keep-alive ``http.client`` connection, and an answer counts when it is a
    200 whose JSON has hits.
    """
    import http.client
    import json
    from urllib.parse import urlsplit

    lat: list[float] = []
    lock = threading.Lock()
    local = threading.local()
    threads_seen = iter(range(1 << 30))
    failures = 0

    def one(i: int) -> None:
        nonlocal failures
        conn = getattr(local, "conn", None)
        if conn is None:
            with lock:
                host = urlsplit(urls[next(threads_seen) % len(urls)])
            conn = local.conn = http.client.HTTPConnection(host.hostname, host.port, timeout=120)
        t0 = time.perf_counter()
        try:
            conn.request(
                "POST",
                "/v1/search",
                body=bodies[i % len(bodies)],
                headers={"content-type": "application/json"},
            )
            r = conn.getresponse()
            body = r.read()
            if r.status != 200 or "hits" not in json.loads(body):
                raise RuntimeError(f"{r.status} {body[:200]!r}")
        except Exception:
            local.conn = None
            conn.close()
            with lock:
                failures += 1
        with lock:
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    return {
        "qps": n / wall,
        "p50_ms": 1e3 * percentile(lat, 50),
        "p99_ms": 1e3 * percentile(lat, 99),
        "failures": failures,
    }


def ingest_test(
    client: GracefulClient, ids: list[str], images: np.ndarray, labels: np.ndarray, batch: int, threads: int
) -> float:
    """Images/s acknowledged by ``POST /v1/items`` from ``threads`` lean clients (bodies encoded beforehand:
    the clients share the cores with the server, and encoding PNGs is the client's cost, not the service's)."""
    import http.client
    import json
    from urllib.parse import urlsplit

    bodies = [
        json.dumps(
            {
                "items": [
                    {"external_id": e, "image_base64": encode_png_base64(im), "metadata": {"label": int(y)}}
                    for e, im, y in zip(
                        ids[s : s + batch], images[s : s + batch], labels[s : s + batch], strict=True
                    )
                ]
            }
        ).encode()
        for s in range(0, len(ids), batch)
    ]
    host = urlsplit(client.url)
    headers = {"content-type": "application/json", **client.headers}

    def send(chunk: list[bytes]) -> None:
        conn = http.client.HTTPConnection(host.hostname, host.port, timeout=300)
        for body in chunk:
            conn.request("POST", "/v1/items", body=body, headers=headers)
            r = conn.getresponse()
            answer = r.read()
            if r.status != 200:
                raise RuntimeError(f"ingest failed: {r.status} {answer[:300]!r}")
        conn.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(send, [bodies[t::threads] for t in range(threads)]))
    return len(ids) / (time.perf_counter() - t0)


class InProcessSearch:
    """The server's search pipeline without HTTP: decode, the micro-batcher with the service's default
    settings (threads, batch size, wait), FAISS over ``gallery`` and the metadata lookup, for ``model``
    (served as version ``version``). ``batched(png)`` answers one query; ``close()`` stops the batcher."""

    def __init__(self, gallery, model, version: str) -> None:
        from service.models.hot_swap import ActiveModel
        from service.serving.batching import MicroBatcher
        from service.serving.search import run_search_batch
        from service.settings import Settings

        defaults = Settings()
        if defaults.torch_threads:  # the in-process side runs with the server's default threads too
            torch.set_num_threads(defaults.torch_threads)
        self.defaults = defaults
        self.prep = model.preprocess
        self.active = ActiveModel(version=version, space=model.card.space, loaded=model, activated_at=0.0)
        self.batcher = MicroBatcher(
            "bench",
            lambda key, jobs: run_search_batch(gallery, key, jobs),
            max_size=defaults.batch_max_size,
            max_wait_s=defaults.batch_max_wait_ms / 1e3,
            max_queue=defaults.batch_max_queue,
            on_start=self.faiss_threads,
        ).start()
        self.faiss_threads()

    def faiss_threads(self) -> None:
        import faiss

        faiss.omp_set_num_threads(self.defaults.faiss_threads or 1)

    def batched(self, png: bytes) -> None:
        from service.serving.search import SearchJob

        with self.batcher.announce():
            img = decode_image(png, prep=self.prep, max_pixels=1 << 20, what="q")
            future = self.batcher.submit(self.active, SearchJob(img, 10, True))
        future.result()

    def close(self) -> None:
        self.batcher.close()


def inprocess_test(pipeline, pngs: list[bytes], concurrency: int, n: int) -> dict:
    lat: list[float] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        t0 = time.perf_counter()
        pipeline(pngs[i % len(pngs)])
        with lock:
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    return {"qps": n / wall, "p50_ms": 1e3 * percentile(lat, 50), "p99_ms": 1e3 * percentile(lat, 99)}


def synthetic_vectors(v1, n: int, seed: int = 0) -> np.ndarray:
    """(n, d) float32 unit rows in v1's space that lie where real embeddings do: a point up to halfway from
    one real v1 embedding (of a Fashion-MNIST train image) towards another, plus a little isotropic noise
    (norm ~0.05). Pure isotropic noise would have no neighbourhood structure for an index to exploit."""
    train = load_split(None, "train")
    centers = embed_images(v1, train.images)  # (60000, d)
    d = centers.shape[1]
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        i, j = rng.integers(0, len(centers), m), rng.integers(0, len(centers), m)
        t = rng.uniform(0, 0.5, (m, 1)).astype(np.float32)
        x = (
            centers[i]
            + t * (centers[j] - centers[i])
            + 0.05 * rng.standard_normal((m, d), np.float32) / np.sqrt(d)
        )
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def make_gallery(models: Path, data: Path, vectors: np.ndarray) -> float:
    """A gallery of ``vectors`` as items ``s0..`` embedded by v1 (written directly, not over HTTP); seconds."""
    from index import Gallery, NewItem, VersionInfo
    from trainer.artifact import read_card

    shutil.rmtree(data, ignore_errors=True)
    t0 = time.perf_counter()
    g = Gallery.open(None, data)
    card = read_card(models / "v1")
    g.register_version(
        VersionInfo(
            version="v1",
            space=card.space,
            embedding_dim=card.embedding_dim,
            compatible_with=card.compatible_with,
            card=card.model_dump(mode="json"),
        )
    )
    for s in range(0, len(vectors), 20_000):
        g.add([NewItem(f"s{s + i}", v) for i, v in enumerate(vectors[s : s + 20_000])], "v1")
    g.close()
    return time.perf_counter() - t0


def timed_activations(c: GracefulClient, repeats: int) -> list[float]:
    """Seconds per hot swap (v2, v1 alternately, timed by the client); ends with v1 active."""
    out = []
    for i in range(repeats):
        t0 = time.perf_counter()
        c.activate("v2" if i % 2 == 0 else "v1")
        out.append(time.perf_counter() - t0)
    if repeats % 2:
        c.activate("v1")
    return out


def server_env(models: Path, data: Path, **extra: str) -> dict[str, str]:
    return {
        "GRACEFUL_MODELS_DIR": str(models),
        "GRACEFUL_DATA_DIR": str(data),
        "GRACEFUL_API_KEY": KEY,
        "GRACEFUL_ACTIVE_MODEL": "v1",
        **extra,
    }


def wait_for_index(c: GracefulClient, factory: str, timeout: float) -> dict:
    """Poll GET /v1/index until space v1 is served by ``factory`` with no build running; its entry."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sp = c.get("/v1/index")["spaces"][0]
        if sp["built_factory"] == factory and sp["building"] is None and sp["last_build"]:
            return sp
        time.sleep(2)
    raise RuntimeError(f"the {factory} index was not built within {timeout}s")


def large_gallery(args, models: Path, work: Path, test, q_idx: np.ndarray) -> dict:
    """1e6 synthetic items: activation at 1e4 vs 1e6, then the approximate index built in the background
    (exact search meanwhile), its QPS and recall@10 vs exact, measured over HTTP on real query images."""
    from index.background_build import _ExactTopK

    n = args.large
    v1 = load_model(models / "v1")
    vectors = synthetic_vectors(v1, n)
    res: dict = {"n": n, "factory": args.factory, "params": args.params}
    res["write_s"] = make_gallery(models, work / "large", vectors)
    make_gallery(models, work / "small", vectors[:10_000])
    print(f"galleries written ({n:,} items in {res['write_s']:.0f}s)", flush=True)

    # Activation time vs gallery size (default Flat index; activation reads counts, not embeddings).
    act = {}
    for name, size in (("small", 10_000), ("large", n)):
        server = LocalServer(server_env(models, work / name), work / f"act-{name}.log").start(timeout=900)
        try:
            act[size] = timed_activations(GracefulClient(server.url, KEY), args.activation_repeats)
        finally:
            server.stop(timeout=300)
    res["activation"] = act
    print(f"activation: { {k: statistics.median(v) for k, v in act.items()} }", flush=True)

    # The approximate index: configured by settings, built in the background at start-up.
    t0 = time.perf_counter()
    server = LocalServer(
        server_env(
            models, work / "large", GRACEFUL_INDEX_FACTORY=args.factory, GRACEFUL_INDEX_PARAMS=args.params
        ),
        work / "large.log",
    ).start(timeout=900)
    res["start_s"] = time.perf_counter() - t0
    c = GracefulClient(server.url, KEY)
    try:
        payloads = [
            {"image_base64": encode_png_base64(test.images[i]), "k": 10, "include_metadata": False}
            for i in q_idx[:500]
        ]
        sp = c.get("/v1/index")["spaces"][0]
        res["serving_at_start"] = sp["built_factory"]
        during = load_test(c, payloads, 16, 200)  # exact search over all n while the index is built
        res["during_build"] = {**during, "built_factory": c.get("/v1/index")["spaces"][0]["built_factory"]}
        sp = wait_for_index(c, args.factory, 3600)
        res["build"] = sp["last_build"]
        res["stated_recall"] = sp["recall"]
        print(f"built: {sp['last_build']}", flush=True)
        res["qps"] = {conc: load_test(c, payloads, conc, 300 if conc == 1 else 1500) for conc in (1, 16)}
        # Recall@10 of the HTTP answers vs exact search over the same vectors, for real query images.
        qv = embed_images(v1, test.images[q_idx[:500]])
        exact = _ExactTopK(qv, 10)
        for s in range(0, n, 100_000):
            exact.update(np.arange(s, min(s + 100_000, n)), vectors[s : s + 100_000])
        hits = 0
        for i, p in enumerate(payloads):
            got = {int(h["external_id"][1:]) for h in c.post("/v1/search", json=p)["hits"]}
            hits += len(got & set(exact.ids[i].tolist()))
        res["http_recall"] = hits / (10 * len(payloads))
        print(f"large: {res['qps']}, recall over HTTP {res['http_recall']:.4f}", flush=True)
    finally:
        server.stop(timeout=300)
    return res


def thread_sweep(models: Path, data_src: Path, work: Path, payloads: list[dict], rounds: int, n: int) -> dict:
    """HTTP c=1 latency and c=16 throughput per (torch_threads, faiss_threads), configs alternated per round."""
    configs = [(1, 1), (2, 1), (1, 2), (2, 2)]
    out: dict = {cfg: [] for cfg in configs}
    for r in range(rounds):
        for cfg in configs if r % 2 == 0 else configs[::-1]:
            data = work / "sweep"
            shutil.rmtree(data, ignore_errors=True)
            shutil.copytree(data_src, data)
            server = LocalServer(
                server_env(
                    models, data, GRACEFUL_TORCH_THREADS=str(cfg[0]), GRACEFUL_FAISS_THREADS=str(cfg[1])
                ),
                work / "sweep.log",
            ).start()
            try:
                c = GracefulClient(server.url, KEY)
                load_test(c, payloads, 16, 100)  # warm
                out[cfg].append(
                    {"c1": load_test(c, payloads, 1, n // 4), "c16": load_test(c, payloads, 16, n)}
                )
            finally:
                server.stop()
    return {
        f"{t}/{f}": {
            "c1_p50_ms": statistics.median(x["c1"]["p50_ms"] for x in v),
            "c1_p99_ms": statistics.median(x["c1"]["p99_ms"] for x in v),
            "c16_qps": statistics.median(x["c16"]["qps"] for x in v),
            "c16_p99_ms": statistics.median(x["c16"]["p99_ms"] for x in v),
        }
        for (t, f), v in out.items()
    }


def run(args) -> dict:
    models = models_dir(args)
    test = load_split(None, "test")
    q_idx, g_idx = query_gallery_split(len(test))
    if args.quick:
        q_idx, g_idx = q_idx[:200], g_idx[:1000]
    res: dict = {"models": str(models.relative_to(REPO)), "queries": len(q_idx), "gallery": len(g_idx)}
    v1, v2 = load_model(models / "v1"), load_model(models / "v2")
    sub = test if not args.quick else None
    if sub is None:
        idx = np.concatenate([q_idx, g_idx])
        from trainer.data import Dataset

        order = np.argsort(idx)
        sub = Dataset(test.images[idx[order]], test.labels[idx[order]], test.class_names)
    offline = evaluate_models([v1, v2], test)  # the trainer's matrix on the full protocol
    res["offline"] = {
        k: {m: offline.matrix[k][m] for m in ("top1", "top5", "mAP")} for k in ("v1/v1", "v2/v1")
    }

    work = Path(tempfile.mkdtemp(prefix="graceful-bench-"))
    try:
        data = work / "data"
        server = LocalServer(
            {
                "GRACEFUL_MODELS_DIR": str(models),
                "GRACEFUL_DATA_DIR": str(data),
                "GRACEFUL_API_KEY": KEY,
                "GRACEFUL_ACTIVE_MODEL": "v1",
                "GRACEFUL_MAX_K": "10000",
            },
            work / "server.log",
        ).start()
        c = GracefulClient(server.url, KEY)
        try:
            ids = [f"t{i}" for i in g_idx]
            label_of = {e: int(test.labels[i]) for e, i in zip(ids, g_idx, strict=True)}
            res["ingest"] = {
                "images_per_s": ingest_test(
                    c, ids, test.images[g_idx], test.labels[g_idx], args.ingest_batch, args.ingest_threads
                ),
                "batch": args.ingest_batch,
                "threads": args.ingest_threads,
                "images": len(ids),
            }
            print(f"ingested {len(ids)}: {res['ingest']}", flush=True)

            http = {}
            http["v1/v1"] = c.evaluate(
                test.images[q_idx], test.labels[q_idx], label_of, k=len(ids), threads=4
            )
            print(f"v1/v1 over HTTP in {http['v1/v1'].seconds:.0f}s: {http['v1/v1'].metrics}", flush=True)
            act = c.activate("v2")
            res["activation_8k_s"] = act["seconds"]
            http["v2/v1"] = c.evaluate(
                test.images[q_idx], test.labels[q_idx], label_of, k=len(ids), threads=4
            )
            print(f"v2/v1 over HTTP in {http['v2/v1'].seconds:.0f}s: {http['v2/v1'].metrics}", flush=True)
            if args.quick:  # the offline matrix above is on the full test split; compare on the same subset
                from trainer.metrics import retrieval_metrics

                for key, qm in (("v1/v1", v1), ("v2/v1", v2)):
                    res["offline"][key] = retrieval_metrics(
                        embed_images(qm, test.images[q_idx]),
                        test.labels[q_idx],
                        embed_images(v1, test.images[g_idx]),
                        test.labels[g_idx],
                    )
            res["http"] = {k: v.metrics for k, v in http.items()}
            res["http_versions"] = {k: v.versions for k, v in http.items()}

            # Latency and throughput: HTTP (micro-batched, and with batches of 1 on a copy of the data) vs the
            # same pipeline in-process (batched, and one query at a time), rounds interleaved.
            server.stop()
            shutil.copytree(data, work / "data-nobatch")
            server.start()
            c = GracefulClient(server.url, KEY)
            nobatch = LocalServer(
                {
                    "GRACEFUL_MODELS_DIR": str(models),
                    "GRACEFUL_DATA_DIR": str(work / "data-nobatch"),
                    "GRACEFUL_API_KEY": KEY,
                    "GRACEFUL_BATCH_MAX_SIZE": "1",
                },
                work / "nobatch.log",
            ).start()
            cnb = GracefulClient(nobatch.url, KEY)
            from index import Gallery

            pngs = [encode_png(test.images[i]) for i in q_idx[:500]]
            payloads = [{"image_base64": encode_png_base64(test.images[i]), "k": 10} for i in q_idx[:500]]
            local = Gallery.open(f"sqlite:///{data / 'gallery.db'}", work / "local-data")
            pipeline = InProcessSearch(local, v2, "v2")
            defaults, prep, batched = pipeline.defaults, pipeline.prep, pipeline.batched

            def one_by_one(png: bytes) -> None:
                img = decode_image(png, prep=prep, max_pixels=1 << 20, what="q")
                vec = embed_images(v2, img[None])
                hits = local.search(v2.card.space, vec, 10)[0]
                local.get_metadata([h.external_id for h in hits])

            n = 200 if args.quick else 1000
            lat: dict[str, list[dict]] = {}
            for _ in range(args.rounds):
                for conc in (1, 16):
                    lat.setdefault(f"http_c{conc}", []).append(load_test(c, payloads, conc, n))
                    lat.setdefault(f"inproc_c{conc}", []).append(inprocess_test(batched, pngs, conc, n))
                    lat.setdefault(f"httpnb_c{conc}", []).append(load_test(cnb, payloads, conc, n))
                    lat.setdefault(f"inprocnb_c{conc}", []).append(inprocess_test(one_by_one, pngs, conc, n))
            pipeline.close()
            local.close()
            nobatch.stop()
            res["latency"] = {
                k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in lat.items()
            }
            res["batch_defaults"] = {
                "max_size": defaults.batch_max_size,
                "max_wait_ms": defaults.batch_max_wait_ms,
                "torch_threads": defaults.torch_threads,
                "faiss_threads": defaults.faiss_threads,
            }
            print(f"latency: {res['latency']}", flush=True)

            # The backfill report's prediction next to a measured re-embed of the gallery with v2.
            rep = c.report("v2")
            res["report_v2"] = {
                "predicted_s": rep["predicted"]["wall_seconds"],
                "items": rep["items_to_reembed"],
                "throughput": rep["throughput"]["images_per_second"],
            }
            t0 = time.perf_counter()
            c.ingest_all(ids, test.images[g_idx], test.labels[g_idx], batch=256, threads=2, upsert=True)
            res["report_v2"]["measured_s"] = time.perf_counter() - t0
        finally:
            server.stop()
        if args.sweep_rounds:
            res["sweep"] = thread_sweep(
                models, data, work, payloads, args.sweep_rounds, 200 if args.quick else 600
            )
            print(f"sweep: {res['sweep']}", flush=True)
        if args.large:
            res["large"] = large_gallery(args, models, work, test, q_idx)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return res


def _ratio_row(label: str, a: dict, b: dict) -> str:
    return (
        f"| {label} | {a['qps']:.0f} | {b['qps']:.0f} | **{a['qps'] / b['qps']:.2f}** | "
        f"{a['p50_ms']:.1f} / {a['p99_ms']:.1f} | {b['p50_ms']:.1f} / {b['p99_ms']:.1f} |"
    )


def render(res: dict, args) -> str:
    lat = res["latency"]
    o, h = res["offline"], res["http"]
    rows = []
    for key in ("v1/v1", "v2/v1"):
        for m in ("top1", "top5", "mAP"):
            d = h[key][m] - o[key][m]
            rows.append(
                f"| {key} | {m} | {o[key][m]:.4f} | {h[key][m]:.4f} | {d:+.4f} | {'ok' if abs(d) <= 0.01 else '**>0.01**'} |"
            )
    rep = res["report_v2"]
    bd = res["batch_defaults"]
    ing = res["ingest"]
    lines = [
        "## Service",
        "",
        f"Command: {command_line()}",
        "",
        machine_line(),
        f"Models: `{res['models']}` (v1 and its BCT child v2). One `graceful serve` process on 127.0.0.1 with default "
        f"settings (SQLite, Flat index, micro-batching: at most {bd['max_size']} queries per batch, waiting at most "
        f"{bd['max_wait_ms']} ms and only while more requests are being read; torch_threads={bd['torch_threads']}, "
        f"faiss_threads={bd['faiss_threads']}); clients are threads of the benchmark process (httpx, keep-alive), "
        f"sharing the machine's 2 cores with the server. "
        f"Protocol: {res['queries']} query images (PNG, base64 JSON) against {res['gallery']} gallery images "
        f"ingested over HTTP with v1.",
        "",
        "### Quality from the HTTP answers vs the trainer's matrix",
        "",
        "Full rankings over HTTP (k = gallery size, metadata off), metrics computed from the returned ids.",
        "",
        "| query/gallery | metric | trainer | HTTP | difference | within 0.01 |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Versions that answered: {res['http_versions']}.",
        "",
        "### Search latency and throughput: HTTP vs the same pipeline in-process",
        "",
        f"Search by image, k=10, metadata on, v2 active, over the {res['gallery']:,}-image gallery. Pipeline = decode "
        "PNG, embed, FAISS search, metadata lookup. *Batched* = the service's micro-batcher (concurrent queries share "
        "one forward and one FAISS search); in-process runs the same code (`service.serving.search` behind "
        "`service.serving.batching`) on a gallery opened on the server's database, with threads as clients. *One by one* = "
        "HTTP with `GRACEFUL_BATCH_MAX_SIZE=1` (on a copy of the data), and in-process one query per call. "
        f"Medians of {args.rounds} interleaved rounds of {200 if args.quick else 1000} requests.",
        "",
        "| concurrency, what | HTTP QPS | in-process QPS | ratio | HTTP p50 / p99 ms | in-process p50 / p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for conc in (1, 16):
        lines.append(_ratio_row(f"{conc}, batched", lat[f"http_c{conc}"], lat[f"inproc_c{conc}"]))
        lines.append(_ratio_row(f"{conc}, one by one", lat[f"httpnb_c{conc}"], lat[f"inprocnb_c{conc}"]))
    gain = lat["http_c16"]["qps"] / lat["httpnb_c16"]["qps"]
    lines += [
        "",
        f"Micro-batching over HTTP at concurrency 16: **{gain:.2f}x** the throughput of batches of one "
        f"({lat['http_c16']['qps']:.0f} vs {lat['httpnb_c16']['qps']:.0f} QPS, same run). HTTP vs in-process at "
        f"concurrency 16, both batched: **{lat['http_c16']['qps'] / lat['inproc_c16']['qps']:.2f}**; vs the in-process "
        f"pipeline one query at a time: **{lat['http_c16']['qps'] / lat['inprocnb_c16']['qps']:.2f}**.",
        "",
        f"HTTP failures during the load: {sum(lat[k]['failures'] for k in lat if k.startswith('http'))}.",
        "",
    ]
    if "sweep" in res:
        lines += [
            "### Thread settings",
            "",
            "HTTP search by image on a copy of the same data, one server per setting, settings alternated over "
            f"{args.sweep_rounds} rounds (medians). `torch_threads` = intra-op threads of a forward; `faiss_threads` "
            "= OpenMP threads of a FAISS search (set in the batch worker thread: OpenMP keeps it per thread).",
            "",
            "| torch / faiss threads | c=1 p50 / p99 ms | c=16 QPS | c=16 p99 ms |",
            "|---|---|---|---|",
            *[
                f"| {k} | {v['c1_p50_ms']:.1f} / {v['c1_p99_ms']:.1f} | {v['c16_qps']:.0f} | {v['c16_p99_ms']:.1f} |"
                for k, v in res["sweep"].items()
            ],
            "",
        ]
    lines += [
        "### Ingest over HTTP",
        "",
        f"**{ing['images_per_s']:,.0f} images/s**: {ing['images']:,} images as JSON base64 PNG in requests of "
        f"{ing['batch']} from {ing['threads']} client threads, acknowledged after the SQL commit; sources kept "
        "(one fsynced file per image, fsyncs issued in parallel); concurrent requests share one forward and one "
        "transaction. Request bodies were encoded before the clock started (the clients share the cores).",
        "",
    ]
    if "large" in res:
        lg = res["large"]
        b = lg["build"]
        act = lg["activation"]
        (ns, ts), (nb, tb) = sorted(act.items())
        q1, q16 = lg["qps"][1], lg["qps"][16]
        lines += [
            f"### A gallery of {lg['n']:,} items",
            "",
            f"{lg['n']:,} synthetic vectors in v1's space (each a point up to halfway from one real v1 embedding of a "
            "Fashion-MNIST train image towards another, plus noise of norm ~0.05: they lie where real embeddings "
            f"do), written to the gallery directly in {lg['write_s']:.0f} s. The server is started with "
            f"`GRACEFUL_INDEX_FACTORY={lg['factory']}` `GRACEFUL_INDEX_PARAMS={lg['params']}`: it serves exact "
            f"(`{lg['serving_at_start']}`) at once (start-up {lg['start_s']:.0f} s) and builds the index in the "
            f"background; meanwhile search by image at concurrency 16 ran at {lg['during_build']['qps']:.1f} QPS "
            f"(p99 {lg['during_build']['p99_ms']:.0f} ms, {lg['during_build']['failures']} failures) on "
            f"`{lg['during_build']['built_factory']}`. The build took {b['seconds']:.0f} s ({b['replayed']} writes "
            "replayed) and was swapped in.",
            "",
            "| measure | value |",
            "|---|---|",
            f"| recall@10 vs exact, stated by the service (`GET /v1/index`, {b['sample']} stored vectors as queries) | "
            f"**{lg['stated_recall']:.4f}** |",
            f"| recall@10 vs exact of the HTTP answers, 500 real query images (v1) | **{lg['http_recall']:.4f}** |",
            f"| search by image, concurrency 1: QPS, p50 / p99 ms | {q1['qps']:.0f}, {q1['p50_ms']:.1f} / "
            f"{q1['p99_ms']:.1f} |",
            f"| search by image, concurrency 16: QPS, p50 / p99 ms | {q16['qps']:.0f}, {q16['p50_ms']:.1f} / "
            f"{q16['p99_ms']:.1f} |",
            "",
            "### Activation time vs gallery size",
            "",
            f"Hot swap v1 ⇄ v2 over galleries of the synthetic v1 vectors (Flat index), {len(ts)} activations each, timed "
            "by the client.",
            "",
            "| items | median s | max s |",
            "|---|---|---|",
            f"| {ns:,} | {statistics.median(ts):.3f} | {max(ts):.3f} |",
            f"| {nb:,} | {statistics.median(tb):.3f} | {max(tb):.3f} |",
            "",
            f"Ratio {nb:,} / {ns:,} items: **{statistics.median(tb) / statistics.median(ts):.2f}** (it loads and warms "
            f"the model, then checks counts; it reads no embeddings). Activation of v2 over the "
            f"{res['gallery']:,}-image gallery: {res['activation_8k_s']:.3f} s (server-side).",
            "",
        ]
    lines += [
        "### Backfill report: predicted vs measured",
        "",
        f"The report for v2 predicted {rep['predicted_s']:.1f} s to re-embed {rep['items']} items "
        f"({rep['throughput']:.0f} img/s measured by its probe: decode + embed). Re-embedding the gallery with v2 "
        f"through the API (upsert, 2 client threads) took **{rep['measured_s']:.1f} s** "
        f"(measured / predicted = {rep['measured_s'] / rep['predicted_s']:.2f}); the difference is HTTP, base64 and "
        f"SQL writes, which the probe does not include.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--activation-repeats", type=int, default=6)
    p.add_argument("--models", help="folder with model versions v1 and v2 (v2 a BCT child of v1)")
    p.add_argument("--ingest-batch", type=int, default=256, help="images per ingest request")
    p.add_argument("--ingest-threads", type=int, default=4, help="ingest client threads")
    p.add_argument(
        "--sweep-rounds", type=int, default=2, help="rounds of the thread-settings sweep (0: skip)"
    )
    p.add_argument(
        "--large", type=int, default=None, help="items of the large gallery (default 1e6; quick 50k; 0: skip)"
    )
    p.add_argument("--factory", default="IVF1024,Flat", help="GRACEFUL_INDEX_FACTORY of the large gallery")
    p.add_argument("--params", default="nprobe=32", help="GRACEFUL_INDEX_PARAMS of the large gallery")
    p.add_argument("--write", action=argparse.BooleanOptionalAction, default=None)
    args = p.parse_args(argv)
    if args.large is None:
        args.large = 50_000 if args.quick else 1_000_000
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    res = run(args)
    text = render(res, args)
    print(text)
    if (not args.quick) if args.write is None else args.write:
        write_section("Service", text)
        print("wrote the section to BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
