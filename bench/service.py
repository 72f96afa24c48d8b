"""Service benchmark: quality over HTTP vs the trainer's matrix, latency and throughput vs in-process,
activation time vs gallery size, and the backfill report's prediction vs a measured re-embed.

    .venv/bin/python bench/service.py            # full protocol; writes "## Service" in BENCHMARKS.md
    .venv/bin/python bench/service.py --quick    # smaller; prints only

Models: v1 and v2 (BCT) of bench/compat.py's seed 0 when present (bench/out/compat/full/seed0), else trained
here with the same defaults. Everything runs on this machine: one server process on 127.0.0.1, clients in
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import command_line, machine_line, write_section  # noqa: E402
from service.client import GracefulClient  # noqa: E402
from service.images import decode_image, encode_png, encode_png_base64  # noqa: E402
from service.local_server import LocalServer  # noqa: E402
from trainer.artifact import embed_images, load_model  # noqa: E402
from trainer.data import load_split, query_gallery_split  # noqa: E402
from trainer.evaluate import evaluate_models  # noqa: E402
from trainer.train import TrainConfig, reusable, train  # noqa: E402

KEY = "bench-key"


def models_dir(args) -> Path:
    compat = REPO / "bench" / "out" / "compat" / "full" / "seed0"
    if (compat / "v1" / "card.json").exists() and (compat / "v2" / "card.json").exists() and not args.quick:
        return compat
    root = REPO / "bench" / "out" / "service" / ("quick" if args.quick else "full")
    limit = 5000 if args.quick else None
    cfgs = [TrainConfig(out=str(root / "v1"), classes="0-4", epochs=1 if args.quick else 6, limit=limit),
            TrainConfig(out=str(root / "v2"), old=str(root / "v1"), bct="full", epochs=1 if args.quick else 12,
                        limit=limit)]
    for cfg in cfgs:
        if not reusable(cfg):
            print(f"training {cfg.out}", flush=True)
            train(cfg)
    return root


def percentile(xs: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(xs), p))


def load_test(client: GracefulClient, payloads: list[dict], concurrency: int, n: int) -> dict:
    """``n`` image searches from ``concurrency`` client threads; per-request latency and overall QPS."""
    lat: list[float] = []
    lock = threading.Lock()
    failures = 0

    def one(i: int) -> None:
        nonlocal failures
        t0 = time.perf_counter()
        try:
            client.post("/v1/search", json=payloads[i % len(payloads)])
        except Exception:
            with lock:
                failures += 1
        with lock:
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    return {"qps": n / wall, "p50_ms": 1e3 * percentile(lat, 50), "p99_ms": 1e3 * percentile(lat, 99),
            "failures": failures}


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


def activation_times(models: Path, work: Path, n_items: int, repeats: int) -> list[float]:
    """Seconds per activation (v2, v1 alternately) over a gallery of ``n_items`` synthetic v1 vectors."""
    from index import Gallery, NewItem, VersionInfo
    from trainer.artifact import read_card

    data = work / f"act-{n_items}"
    shutil.rmtree(data, ignore_errors=True)
    g = Gallery.open(None, data)
    card = read_card(models / "v1")
    g.register_version(VersionInfo(version="v1", space=card.space, embedding_dim=card.embedding_dim,
                                   compatible_with=None, card=card.model_dump(mode="json")))
    rng = np.random.default_rng(0)
    for s in range(0, n_items, 10_000):
        m = min(10_000, n_items - s)
        vecs = rng.normal(size=(m, card.embedding_dim)).astype(np.float32)
        g.add([NewItem(f"s{s + i}", v) for i, v in enumerate(vecs)], "v1")
    g.close()
    server = LocalServer({"GRACEFUL_MODELS_DIR": str(models), "GRACEFUL_DATA_DIR": str(data), "GRACEFUL_API_KEY": KEY,
                          "GRACEFUL_ACTIVE_MODEL": "v1"}, work / f"act-{n_items}.log").start()
    try:
        c = GracefulClient(server.url, KEY)
        out = []
        for i in range(repeats):
            t0 = time.perf_counter()
            c.activate("v2" if i % 2 == 0 else "v1")
            out.append(time.perf_counter() - t0)
        return out
    finally:
        server.stop()


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
    res["offline"] = {k: {m: offline.matrix[k][m] for m in ("top1", "top5", "mAP")} for k in ("v1/v1", "v2/v1")}

    work = Path(tempfile.mkdtemp(prefix="graceful-bench-"))
    try:
        data = work / "data"
        server = LocalServer({"GRACEFUL_MODELS_DIR": str(models), "GRACEFUL_DATA_DIR": str(data),
                              "GRACEFUL_API_KEY": KEY, "GRACEFUL_ACTIVE_MODEL": "v1", "GRACEFUL_MAX_K": "10000"},
                             work / "server.log").start()
        c = GracefulClient(server.url, KEY)
        try:
            ids = [f"t{i}" for i in g_idx]
            label_of = {e: int(test.labels[i]) for e, i in zip(ids, g_idx, strict=True)}
            t0 = time.perf_counter()
            c.ingest_all(ids, test.images[g_idx], test.labels[g_idx], batch=256, threads=2)
            res["ingest_images_per_s"] = len(ids) / (time.perf_counter() - t0)
            print(f"ingested {len(ids)} in {time.perf_counter() - t0:.1f}s", flush=True)

            http = {}
            http["v1/v1"] = c.evaluate(test.images[q_idx], test.labels[q_idx], label_of, k=len(ids), threads=4)
            print(f"v1/v1 over HTTP in {http['v1/v1'].seconds:.0f}s: {http['v1/v1'].metrics}", flush=True)
            act = c.activate("v2")
            res["activation_8k_s"] = act["seconds"]
            http["v2/v1"] = c.evaluate(test.images[q_idx], test.labels[q_idx], label_of, k=len(ids), threads=4)
            print(f"v2/v1 over HTTP in {http['v2/v1'].seconds:.0f}s: {http['v2/v1'].metrics}", flush=True)
            if args.quick:  # the offline matrix above is on the full test split; compare on the same subset
                from trainer.metrics import retrieval_metrics

                for key, qm in (("v1/v1", v1), ("v2/v1", v2)):
                    res["offline"][key] = retrieval_metrics(
                        embed_images(qm, test.images[q_idx]), test.labels[q_idx],
                        embed_images(v1, test.images[g_idx]), test.labels[g_idx])
            res["http"] = {k: v.metrics for k, v in http.items()}
            res["http_versions"] = {k: v.versions for k, v in http.items()}

            # Latency and throughput: HTTP vs the same pipeline in this process, rounds interleaved.
            from index import Gallery

            pngs = [encode_png(test.images[i]) for i in q_idx[:500]]
            payloads = [{"image_base64": encode_png_base64(test.images[i]), "k": 10} for i in q_idx[:500]]
            local = Gallery.open(f"sqlite:///{data / 'gallery.db'}", work / "local-data")
            prep = v2.preprocess

            def pipeline(png: bytes) -> None:
                img = decode_image(png, channels=prep.channels, size=prep.size, max_pixels=1 << 20, what="q")
                vec = embed_images(v2, img[None])
                hits = local.search(v2.card.space, vec, 10)[0]
                local.get_metadata([h.external_id for h in hits])

            n = 200 if args.quick else 1000
            lat: dict[str, list[dict]] = {}
            for _ in range(args.rounds):
                for conc in (1, 16):
                    lat.setdefault(f"http_c{conc}", []).append(load_test(c, payloads, conc, n))
                    lat.setdefault(f"inproc_c{conc}", []).append(inprocess_test(pipeline, pngs, conc, n))
            local.close()
            res["latency"] = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in lat.items()}
            print(f"latency: {res['latency']}", flush=True)

            # The backfill report's prediction next to a measured re-embed of the gallery with v2.
            rep = c.report("v2")
            res["report_v2"] = {"predicted_s": rep["predicted"]["wall_seconds"], "items": rep["items_to_reembed"],
                                "throughput": rep["throughput"]["images_per_second"]}
            t0 = time.perf_counter()
            c.ingest_all(ids, test.images[g_idx], test.labels[g_idx], batch=256, threads=2, upsert=True)
            res["report_v2"]["measured_s"] = time.perf_counter() - t0
        finally:
            server.stop()
        n_small, n_big = (2_000, 20_000) if args.quick else (10_000, 100_000)
        res["activation"] = {n: activation_times(models, work, n, args.activation_repeats) for n in (n_small, n_big)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return res


def render(res: dict, args) -> str:
    lat = res["latency"]
    o, h = res["offline"], res["http"]
    rows = []
    for key in ("v1/v1", "v2/v1"):
        for m in ("top1", "top5", "mAP"):
            d = h[key][m] - o[key][m]
            rows.append(f"| {key} | {m} | {o[key][m]:.4f} | {h[key][m]:.4f} | {d:+.4f} | {'ok' if abs(d) <= 0.01 else '**>0.01**'} |")
    act = res["activation"]
    (ns, ts), (nb, tb) = sorted(act.items())
    rep = res["report_v2"]
    lines = [
        "## Service", "", f"Command: {command_line()}", "", machine_line(),
        f"Models: `{res['models']}` (v1 and its BCT child v2). One `graceful serve` process on 127.0.0.1 with default "
        f"settings (SQLite, Flat index); clients are threads of the benchmark process (httpx, keep-alive). "
        f"Protocol: {res['queries']} query images (PNG, base64 JSON) against {res['gallery']} gallery images "
        f"ingested over HTTP with v1.", "",
        "### Quality from the HTTP answers vs the trainer's matrix", "",
        "Full rankings over HTTP (k = gallery size, metadata off), metrics computed from the returned ids.", "",
        "| query/gallery | metric | trainer | HTTP | difference | within 0.01 |", "|---|---|---|---|---|---|", *rows, "",
        f"Versions that answered: {res['http_versions']}.", "",
        "### Search latency and throughput: HTTP vs the same pipeline in-process", "",
        "Pipeline = decode PNG, embed with v2, FAISS search (k=10) in space v1, metadata lookup. In-process runs the "
        f"same code on a gallery opened on the server's database, with threads as clients. Medians of {args.rounds} "
        "interleaved rounds.", "",
        "| concurrency | HTTP QPS | in-process QPS | ratio | HTTP p50 / p99 ms | in-process p50 / p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for conc in (1, 16):
        hh, ii = lat[f"http_c{conc}"], lat[f"inproc_c{conc}"]
        lines.append(f"| {conc} | {hh['qps']:.0f} | {ii['qps']:.0f} | **{hh['qps'] / ii['qps']:.2f}** | "
                     f"{hh['p50_ms']:.1f} / {hh['p99_ms']:.1f} | {ii['p50_ms']:.1f} / {ii['p99_ms']:.1f} |")
    lines += [
        "", f"HTTP failures during the load: {sum(lat[k]['failures'] for k in lat if k.startswith('http'))}.", "",
        "### Activation time vs gallery size", "",
        f"Hot swap v1 ⇄ v2 over a gallery of synthetic v1 vectors, {len(ts)} activations each, timed by the client.", "",
        "| items | median s | max s |", "|---|---|---|",
        f"| {ns:,} | {statistics.median(ts):.3f} | {max(ts):.3f} |",
        f"| {nb:,} | {statistics.median(tb):.3f} | {max(tb):.3f} |", "",
        f"Ratio {nb:,} / {ns:,} items: **{statistics.median(tb) / statistics.median(ts):.2f}** (it loads and warms "
        f"the model, then checks counts; it reads no embeddings). Activation of v2 over the 8,000-image gallery: "
        f"{res['activation_8k_s']:.3f} s (server-side).", "",
        "### Backfill report: predicted vs measured", "",
        f"The report for v2 predicted {rep['predicted_s']:.1f} s to re-embed {rep['items']} items "
        f"({rep['throughput']:.0f} img/s measured by its probe: decode + embed). Re-embedding the gallery with v2 "
        f"through the API (upsert, 2 client threads) took **{rep['measured_s']:.1f} s** "
        f"(measured / predicted = {rep['measured_s'] / rep['predicted_s']:.2f}); the difference is HTTP, base64 and "
        f"SQL writes, which the probe does not include.", "",
        f"Ingest over HTTP with v1: {res['ingest_images_per_s']:.0f} images/s (batches of 256, 2 client threads).", "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--activation-repeats", type=int, default=6)
    p.add_argument("--write", action=argparse.BooleanOptionalAction, default=None)
    args = p.parse_args(argv)
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
