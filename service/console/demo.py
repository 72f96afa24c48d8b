"""`graceful demo`: the whole story of the README on real Fashion-MNIST, through the HTTP API.

1. train v1 on classes 0-4; start the service; ingest the gallery (8,000 test images) through HTTP;
2. train v2 with BCT against v1, and an independent v2; show the backfill-cost report of each;
3. hot-swap to v2 while a client keeps searching; show that the independent v2 is refused;
4. measure old/old, new/old (zero backfill) and new/new (after a measured backfill) from HTTP answers.

State lives in ``--workdir`` (default ``demo-state/``): model folders are reused when complete and trained
with the same settings (a folder is complete once its card exists, written last), everything else (the
gallery database, indexes, sources) is replaced on each run, so a second run never mixes old and new state.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.console.client import ApiError, GracefulClient
from service.console.local_server import LocalServer
from trainer.data import load_split, query_gallery_split

OLD_CLASSES = "0-4"


def _bar(total: int, desc: str, unit: str = "img"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=True)


def _train(out: Path, desc: str, **kw) -> None:
    """Train unless ``out`` holds a complete model trained with the same settings."""
    from trainer.train import TrainConfig, reusable, train

    cfg = TrainConfig(out=str(out), **kw)
    if reusable(cfg):
        print(f"  {desc}: reusing {out} (same settings)")
        return
    shutil.rmtree(out, ignore_errors=True)
    bar = None

    def progress(step: int, total: int, terms: dict[str, float]) -> None:
        nonlocal bar
        if bar is None:
            bar = _bar(total, f"  {desc}", unit="step")
        bar.update(step - bar.n)
        if step % 20 == 0:
            bar.set_postfix({k: f"{v:.3f}" for k, v in terms.items()}, refresh=False)

    try:
        train(cfg, progress=progress)
    finally:
        if bar is not None:
            bar.close()


def _wait_api(client: GracefulClient, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.get("/healthz")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _search_during_swap(
    client: GracefulClient, images: np.ndarray, target: str, threads: int = 2, force_if_refused: bool = False
) -> dict:
    """Clients search without pause while ``target`` is activated; counts requests, failures, versions.
    ``force_if_refused``: a swap the measured check refuses is forced (--quick models are too briefly trained
    to be compatible), and the demo says so."""
    stop = threading.Event()
    stats: dict[str, Any] = {"requests": 0, "failed": 0, "versions": {}}
    lock = threading.Lock()

    def loop(n: int) -> None:
        i = n
        while not stop.is_set():
            try:
                v = client.search_image(images[i % len(images)], k=10, include_metadata=False)[
                    "model_version"
                ]
                with lock:
                    stats["requests"] += 1
                    stats["versions"][v] = stats["versions"].get(v, 0) + 1
            except Exception:
                with lock:
                    stats["requests"] += 1
                    stats["failed"] += 1
            i += threads

    workers = [threading.Thread(target=loop, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    try:
        time.sleep(1.0)
        try:
            result = client.activate(target)
        except ApiError as e:
            if not (force_if_refused and e.status == 409):
                raise
            print(
                f"  {target} failed the measured compatibility check ({e.detail[:200]}...). --quick models "
                "are one epoch on a slice: forcing the swap (recorded in GET /v1/models/activations)",
                flush=True,
            )
            result = client.activate(target, force=True)
        time.sleep(1.0)
    finally:
        stop.set()
        for w in workers:
            w.join()
    stats["activation"] = result
    return stats


def _usd(x: float) -> str:
    return f"${x:,.2f}" if x >= 0.01 or x == 0 else f"${x:.1g}"


def _fmt(m: dict | None) -> str:
    if not m:
        return "   -        -        -   "
    return f"{m['top1']:.4f}   {m['top5']:.4f}   {m['mAP']:.4f}"


def _at_least(low: int):
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return check


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graceful demo", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="demo-state", help="where models, the gallery and the report go")
    p.add_argument("--models-dir", default=None, help="model folders (default: <workdir>/models)")
    p.add_argument("--data", default=None, help="dataset folder (default: Debian's Fashion-MNIST)")
    p.add_argument(
        "--api", default=None, help="use a running API (key from GRACEFUL_API_KEY) instead of starting one"
    )
    p.add_argument("--epochs-old", type=_at_least(1), default=6)
    p.add_argument("--epochs-new", type=_at_least(1), default=8, help="epochs of v2 (BCT)")
    p.add_argument(
        "--epochs-indep",
        type=_at_least(1),
        default=2,
        help="epochs of the independent v2 (it is only there to be refused and priced)",
    )
    p.add_argument(
        "--queries",
        type=_at_least(0),
        default=500,
        help="query images measured over HTTP, full rankings (the heatmap uses all 2,000)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a small slice of the data (smoke tests)")
    p.add_argument(
        "--keep-serving", action="store_true", help="leave the service running at the end (Ctrl-C stops it)"
    )
    return p


def demo_main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    work = Path(args.workdir).resolve()
    models = Path(args.models_dir).resolve() if args.models_dir else work / "models"
    work.mkdir(parents=True, exist_ok=True)
    models.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    test = load_split(args.data, "test")
    q_idx, g_idx = query_gallery_split(len(test))
    limit = None
    if args.quick:
        q_idx, g_idx, limit = q_idx[:100], g_idx[:400], 3000
    q_idx = q_idx[: args.queries] if args.queries else q_idx
    common = dict(data=args.data, seed=args.seed, limit=limit, eval_limit=1000 if args.quick else None)

    print(f"[1/6] train v1 on classes {OLD_CLASSES} (the model the gallery is built with)")
    _train(models / "v1", "v1", classes=OLD_CLASSES, epochs=1 if args.quick else args.epochs_old, **common)

    server = None
    if args.api:
        client = GracefulClient(args.api, os.environ.get("GRACEFUL_API_KEY"))
        print(f"[2/6] use the service at {args.api}")
        _wait_api(client)
    else:
        data = work / "data"
        shutil.rmtree(data, ignore_errors=True)  # the gallery is rebuilt each run: never half old, half new
        key = secrets.token_urlsafe(16)
        env = {
            "GRACEFUL_MODELS_DIR": str(models),
            "GRACEFUL_DATA_DIR": str(data),
            "GRACEFUL_API_KEY": key,
            "GRACEFUL_ACTIVE_MODEL": "v1",
            "GRACEFUL_MAX_K": "10000",
        }
        env.pop("GRACEFUL_DATABASE_URL", None)
        server = LocalServer(env, work / "service.log")
        client = GracefulClient(server.url, key)
        print(f"[2/6] start the service at {server.url} (SQLite + FAISS files under {data})")
        server.start()
    try:
        return _story(args, client, test, q_idx, g_idx, models, work, common, t_start, server)
    except ApiError as e:
        print(f"graceful demo: the API answered {e}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            rc = server.stop()
            print("service stopped cleanly" if rc == 0 else f"service stopped with exit status {rc}")


def _story(
    args,
    client: GracefulClient,
    test,
    q_idx,
    g_idx,
    models: Path,
    work: Path,
    common: dict,
    t_start: float,
    server: LocalServer | None,
) -> int:
    client.activate("v1")
    ids = [f"fmnist-test-{i}" for i in g_idx]
    label_of = {e: int(test.labels[i]) for e, i in zip(ids, g_idx, strict=True)}
    with _bar(len(ids), "  ingest gallery via HTTP (v1)") as bar:
        t0 = time.perf_counter()
        client.ingest_all(ids, test.images[g_idx], test.labels[g_idx], upsert=True, progress=bar.update)
        ingest_s = time.perf_counter() - t0
    k_full = len(ids)

    def measure(desc: str):
        with _bar(len(q_idx), f"  {desc}", unit="query") as bar:
            return client.evaluate(
                test.images[q_idx], test.labels[q_idx], label_of, k_full, progress=bar.update
            )

    old_old = measure("measure old/old via HTTP")

    print("[3/6] train v2 on all classes: with BCT against v1, and independently")
    _train(
        models / "v2",
        "v2 (BCT)",
        epochs=1 if args.quick else args.epochs_new,
        old=str(models / "v1"),
        bct="full",
        **common,
    )
    _train(models / "v2-indep", "v2-indep", epochs=1 if args.quick else args.epochs_indep, **common)

    print("[4/6] backfill-cost reports")
    reports = {v: client.report(v) for v in ("v2", "v2-indep")}
    for v, r in reports.items():
        p = r["predicted"]
        print(
            f"  {v:9s} needs backfill: {str(r['needs_backfill']):5s}  items to re-embed {r['items_to_reembed']}, "
            f"{r['throughput']['images_per_second']:.0f} img/s -> {p['wall_seconds']:.1f} s, "
            f"{p['cpu_hours']:.2g} CPU-h, {_usd(p['cost'])}"
        )

    print("[5/6] hot-swap to v2 while a client keeps searching; then try the independent v2")
    swap = _search_during_swap(client, test.images[q_idx], "v2", force_if_refused=args.quick)
    counts_after_swap = client.report("v2")["items_per_version"]
    reembedded_by_swap = int(
        counts_after_swap.get("v2", 0)
    )  # items v2 embedded: the swap itself re-embeds none
    check = swap["activation"].get("check") or {}
    if check.get("method") == "measured" and check.get("labelled"):
        lab = check["labelled"]
        print(
            f"  the compatibility check measured v2/v1 mAP {lab['candidate']['mAP']:.4f} against v1/v1 "
            f"{lab['active']['mAP']:.4f} on {lab['queries']} gallery items: "
            + ("passed" if check["passed"] else "failed (forced)")
        )
        rf = lab.get("retrieval_flips")
        if rf:
            print(
                f"  its retrieval flips against v1/v1: NFR {rf['nfr']:.4f} ({rf['n_negative']} queries), "
                f"PFR {rf['pfr']:.4f} ({rf['n_positive']})"
            )
    print(
        f"  swap took {swap['activation']['seconds']:.3f} s; {swap['requests']} searches meanwhile, "
        f"{swap['failed']} failed; versions seen {swap['versions']}; re-embedded {reembedded_by_swap}"
    )
    try:
        client.activate("v2-indep")
        refused = None
    except ApiError as e:
        refused = {"status": e.status, "detail": e.detail}
        print(f"  v2-indep refused: HTTP {e.status}: {e.detail[:160]}...")
    new_old = measure("measure new/old via HTTP (zero backfill)")

    print(
        "[6/6] what a backfill would buy: a backfill job re-embeds the gallery with v2 while serving; new/new"
    )
    job = client.post("/v1/backfill", json={"candidate": "v2", "policy": "sequential"})
    with _bar(len(ids), "  backfill job (v2)", unit="item") as bar:
        t0 = time.perf_counter()
        while job["status"] not in ("done", "failed", "cancelled"):
            time.sleep(0.2)
            job = client.get(f"/v1/backfill/{job['id']}")
            bar.update(job["done"] - bar.n)
        backfill_s = time.perf_counter() - t0
    if job["status"] != "done":
        print(f"  backfill job {job['id']} ended {job['status']}: {job.get('error')}")
    new_new = measure("measure new/new via HTTP")

    from trainer.artifact import load_model
    from trainer.evaluate import evaluate_models
    from trainer.metrics import retrieval_flips
    from trainer.plot import plot_matrix

    offline = evaluate_models(
        [load_model(models / v) for v in ("v1", "v2", "v2-indep")],
        test if not args.quick else test.take(1000, seed=0),
    )
    heatmap = plot_matrix(offline, work / "compat.png")

    predicted = reports["v2"]["predicted"]
    flips = {
        name: retrieval_flips(old_old.top1_hits, e.top1_hits)
        for name, e in (("new_old", new_old), ("new_new", new_new))
        if old_old.top1_hits is not None and e.top1_hits is not None
    }
    summary = {
        "old_old": old_old.metrics,
        "new_old": new_old.metrics,
        "new_new": new_new.metrics,
        "versions_answering": {
            "old_old": old_old.versions,
            "new_old": new_old.versions,
            "new_new": new_new.versions,
        },
        "reembedded_by_swap": reembedded_by_swap,
        "items_per_version_after_swap": counts_after_swap,
        "swap": {k: v for k, v in swap.items() if k != "activation"},
        "swap_seconds": swap["activation"]["seconds"],
        "independent_refused": refused,
        "backfill": {
            "items": len(ids),
            "job": job,
            "measured_seconds": backfill_s,
            "predicted_seconds": predicted["wall_seconds"],
            "predicted_cpu_hours": predicted["cpu_hours"],
            "predicted_cost_usd": predicted["cost"],
            "independent_v2_cost_usd": reports["v2-indep"]["predicted"]["cost"],
        },
        "ingest": {"items": len(ids), "seconds": ingest_s, "images_per_second": len(ids) / ingest_s},
        "queries": len(q_idx),
        "gallery": len(ids),
        "demo_seconds": time.perf_counter() - t_start,
        "offline_matrix": offline.to_json(include_flipped=False)["matrix"],
        "retrieval_flips": flips,  # against old/old, from the HTTP answers (flipped queries by position)
    }
    throughput = reports["v2"]["throughput"]["images_per_second"]
    cpus = reports["v2"]["throughput"]["threads"]
    price = predicted["price_per_cpu_hour"]
    gain = (new_old.metrics["mAP"] - old_old.metrics["mAP"]) / max(
        1e-9, new_new.metrics["mAP"] - old_old.metrics["mAP"]
    )
    table = "\n".join(
        [
            f"quality from the HTTP answers: {len(q_idx)} query images, full rankings of {len(ids)} gallery images",
            f"{'':34s}top-1    top-5    mAP      items re-embedded",
            f"{'old/old  (v1 queries, v1 gallery)':34s}{_fmt(old_old.metrics)}   -",
            f"{'new/old  (v2 queries, v1 gallery)':34s}{_fmt(new_old.metrics)}   {summary['reembedded_by_swap']} (hot swap, no backfill)",
            f"{'new/new  (after full backfill)':34s}{_fmt(new_new.metrics)}   {job['done']} "
            f"(backfill job: {backfill_s:.1f} s, predicted {predicted['wall_seconds']:.1f} s)",
            "",
            f"update gain on mAP with zero backfill: {gain:.2f} of the full upgrade",
            *(
                [
                    "retrieval flips against old/old (top-1 right before, wrong after / the reverse): "
                    + ", ".join(
                        f"{k.replace('_', '/')} NFR {f['nfr']:.4f} PFR {f['pfr']:.4f}"
                        for k, f in flips.items()
                    )
                ]
                if flips
                else []
            ),
            f"requests during the swap: {swap['requests']}, failed: {swap['failed']}",
            f"backfill cost here: {predicted['cpu_hours']:.2g} CPU-hours, {_usd(predicted['cost'])}; at the measured "
            f"{throughput:,.0f} images/s, a gallery of 1 billion items: {1e9 / throughput / 3600 * cpus:,.0f} CPU-hours, "
            f"{_usd(1e9 / throughput / 3600 * cpus * price)}",
            f"independent v2: {'refused with HTTP ' + str(refused['status']) if refused else 'NOT refused'} "
            f"(it needs that backfill first: {_usd(reports['v2-indep']['predicted']['cost'])} here)",
        ]
    )
    print("\n" + table + "\n")
    (work / "report.json").write_text(json.dumps(summary, indent=1) + "\n")
    (work / "report.md").write_text("# graceful demo\n\n```\n" + table + "\n```\n")
    print(f"report: {work / 'report.md'} and report.json; compatibility heatmap: {heatmap}")
    print(f"demo took {summary['demo_seconds']:.0f} s")
    if server is not None and args.keep_serving:
        print(f"the service keeps running at {server.url} (pid {server.pid}); Ctrl-C stops it")
        with contextlib.suppress(KeyboardInterrupt):
            if server.proc is not None:
                server.proc.wait()
    ok = refused is not None and swap["failed"] == 0 and summary["reembedded_by_swap"] == 0
    return 0 if ok else 1
