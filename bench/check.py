"""Verified swaps: the service's compatibility check beside the offline evaluation, and shadow traffic's cost.

On v1's 8,000-image Fashion-MNIST gallery (the test split's gallery half, served by a real `graceful serve`
on 127.0.0.1, sources and labels kept), the check (POST /v1/models/{v}/check, default sample) of
- v2: the BCT child of v1 (bench.common's pair),
- v2-indep-forged: an independent v2 whose card was edited to claim v1's space and parent,
- v2-indep-adapt: v2-indep with a Procrustes adapter into v1's space (5,000 pairs),
beside `graceful eval`'s offline figures of the same pairs (2,000 test queries over the same 8,000 items).
Then search latency at concurrency 4 with no shadow, and with v2 shadowing 10% and 50% of the searches, in
one run. Writes "## Verified swaps" to BENCHMARKS.md.

    .venv/bin/python -m bench.check            # full protocol
    .venv/bin/python -m bench.check --quick    # 1-epoch models on a 5k slice, 1,000 gallery items; prints only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import REPO, command_line, machine_line, v1_v2_models, write_section
from service.console.client import GracefulClient
from service.console.local_server import LocalServer
from trainer.adapt import AdaptConfig, adapt
from trainer.artifact import load_model
from trainer.data import load_split, query_gallery_split
from trainer.evaluate import evaluate_models
from trainer.train import TrainConfig, reusable, train

SECTION = "Verified swaps"
KEY = "bench-key"
CANDIDATES = ("v2", "v2-indep-forged", "v2-indep-adapt")


def build_models(root: Path, quick: bool, epochs_indep: int) -> Path:
    """v1, v2 (BCT), v2-indep, its Procrustes adapter and a forged copy, in one models dir."""
    pair = v1_v2_models("check", quick)
    root.mkdir(parents=True, exist_ok=True)
    for v in ("v1", "v2"):
        if not (root / v / "card.json").exists():
            shutil.copytree(pair / v, root / v)
    limit = 5000 if quick else None
    cfg = TrainConfig(out=str(root / "v2-indep"), seed=1000, epochs=1 if quick else epochs_indep, limit=limit)
    if not reusable(cfg):
        print("training v2-indep", flush=True)
        train(cfg)
    if not (root / "v2-indep-adapt" / "card.json").exists():
        adapt(
            AdaptConfig(
                new=str(root / "v2-indep"),
                old=str(root / "v1"),
                out=str(root / "v2-indep-adapt"),
                kind="procrustes",
                sample=5000,
            )
        )
    forged = root / "v2-indep-forged"
    shutil.rmtree(forged, ignore_errors=True)
    shutil.copytree(root / "v2-indep", forged)
    card = json.loads((forged / "card.json").read_text())
    card.update(version="v2-indep-forged", space="v1", compatible_with="v1")  # the hand edit
    (forged / "card.json").write_text(json.dumps(card, indent=1))
    return root


def latencies(client: GracefulClient, images: np.ndarray, seconds: float, threads: int = 4) -> np.ndarray:
    """Image searches (k=10) from ``threads`` clients for ``seconds``: per-request latency in ms."""
    out: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def loop(n: int) -> None:
        i = n
        mine = []
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            client.search_image(images[i % len(images)], k=10, include_metadata=False)
            mine.append((time.perf_counter() - t0) * 1e3)
            i += threads
        with lock:
            out.extend(mine)

    ts = [threading.Thread(target=loop, args=(n,)) for n in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return np.asarray(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--epochs-indep", type=int, default=6, help="the independent v2 is only there to be refused"
    )
    p.add_argument("--seconds", type=float, default=20.0, help="search load per shadow condition")
    p.add_argument("--write", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "check")
    args = p.parse_args(argv)
    write = (not args.quick) if args.write is None else args.write
    t_start = time.perf_counter()
    root = build_models(
        args.out / ("quick" if args.quick else "full") / "models", args.quick, args.epochs_indep
    )

    test = load_split(None, "test")
    q_idx, g_idx = query_gallery_split(len(test))
    if args.quick:
        q_idx, g_idx = q_idx[:250], g_idx[:1000]
    loaded = {v: load_model(root / v) for v in ("v1", "v2", "v2-indep", "v2-indep-adapt")}
    sub = test if not args.quick else None
    offline = evaluate_models(list(loaded.values()), sub if sub is not None else test).to_json(
        include_flipped=False
    )
    cells = offline["matrix"]
    offline_of = {
        "v2": cells["v2/v1"],
        "v2-indep-forged": cells["v2-indep/v1"],
        "v2-indep-adapt": cells["v2-indep-adapt/v1"],
        "v1": cells["v1/v1"],
    }

    work = Path(tempfile.mkdtemp(prefix="graceful-check-"))
    env = {
        "GRACEFUL_MODELS_DIR": str(root),
        "GRACEFUL_DATA_DIR": str(work / "data"),
        "GRACEFUL_API_KEY": KEY,
        "GRACEFUL_ACTIVE_MODEL": "v1",
        "GRACEFUL_MAX_K": "10000",
    }
    server = LocalServer(env, work / "server.log").start(timeout=300)
    res: dict = {"gallery": len(g_idx), "offline_queries": len(q_idx)}
    try:
        client = GracefulClient(server.url, KEY)
        ids = [f"g{i}" for i in g_idx]
        client.ingest_all(ids, test.images[g_idx], test.labels[g_idx])
        checks = {}
        for v in CANDIDATES:
            t0 = time.perf_counter()
            checks[v] = client.post(f"/v1/models/{v}/check")
            checks[v]["wall_s"] = time.perf_counter() - t0
            print(f"check {v}: passed={checks[v]['passed']} {checks[v]['wall_s']:.1f}s", flush=True)
        refused = {}
        for v in CANDIDATES:
            r = client.http.post(f"/v1/models/{v}/activate", headers=client.headers)
            refused[v] = r.status_code
            if r.status_code == 200:
                client.post("/v1/models/rollback")
        res.update(checks=checks, activation_status=refused)

        qimgs = test.images[q_idx]
        shadow: dict = {}
        for fraction in (0.0, 0.1, 0.5):
            if fraction:
                client.post("/v1/models/v2/shadow", json={"fraction": fraction})
            lat = latencies(client, qimgs, args.seconds)
            row = {
                "requests": len(lat),
                "p50_ms": float(np.percentile(lat, 50)),
                "p99_ms": float(np.percentile(lat, 99)),
                "qps": len(lat) / args.seconds,
            }
            if fraction:
                row["shadow"] = client.http.delete("/v1/models/v2/shadow", headers=client.headers).json()
            shadow[fraction] = row
            print(f"shadow {fraction:.0%}: p99 {row['p99_ms']:.1f} ms", flush=True)
        res["shadow"] = {str(k): v for k, v in shadow.items()}
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    (args.out / "report.json").write_text(json.dumps(res, indent=1, default=float))
    text = render(res, offline_of, time.perf_counter() - t_start)
    print(text)
    if write:
        write_section(SECTION, text)
        print("wrote the section to BENCHMARKS.md")
    return 0


def render(res: dict, offline_of: dict, seconds: float) -> str:
    first = next(iter(res["checks"].values()))
    out = [
        f"## {SECTION}",
        "",
        f"Command: {command_line()}",
        "",
        machine_line(),
        f"Whole run {seconds / 60:.1f} min (model training included when not reused).",
        "",
        f"v1's gallery: {res['gallery']:,} Fashion-MNIST test images, kept sources and labels, served by "
        f"`graceful serve` on 127.0.0.1 (SQLite, Flat). The check (its default sample: {first['sample']['queries']:,} "
        f"gallery items as queries over the stored gallery, each left out of its own ranking) beside the offline "
        f"`graceful eval` figures of the same pair ({res['offline_queries']:,} test queries over the same "
        f"gallery). Top-1 / mAP:",
        "",
        "| candidate | check top-1 | offline top-1 | check mAP | offline mAP | overlap@10 (random twin) | "
        "NFR / PFR | verdict | activation | check wall time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    diffs = []
    act = first["labelled"]["active"]
    off = offline_of["v1"]
    out.append(
        f"| v1 (active, itself) | {act['top1']:.4f} | {off['top1']:.4f} | {act['mAP']:.4f} | "
        f"{off['mAP']:.4f} | - | - | - | - | - |"
    )
    diffs += [abs(act["top1"] - off["top1"]), abs(act["mAP"] - off["mAP"])]
    for v, c in res["checks"].items():
        lab, u, off = c["labelled"], c["unlabelled"], offline_of[v]
        cand = lab["candidate"]
        diffs += [abs(cand["top1"] - off["top1"]), abs(cand["mAP"] - off["mAP"])]
        out.append(
            f"| {v} | {cand['top1']:.4f} | {off['top1']:.4f} | {cand['mAP']:.4f} | {off['mAP']:.4f} | "
            f"{u['overlap_at_10']:.3f} ({u['baseline']['overlap_at_10']:.3f}) | "
            f"{lab['negative_flip_rate']:.3f} / {lab['positive_flip_rate']:.3f} | "
            f"{'passes' if c['passed'] else 'fails'} | HTTP {res['activation_status'][v]} | "
            f"{c['wall_s']:.1f} s |"
        )
    worst = max(diffs)
    out += [
        "",
        f"Largest gap between the check's labelled figures and the offline ones: **{worst:.4f}** (aim ≤ 0.02: "
        f"{'met' if worst <= 0.02 else 'missed'}). The forged card claims v1's space; its measured figures "
        "refuse it (409) whatever the card says.",
        "",
        "Search latency at concurrency 4 (image searches, k=10, the 2,000 test queries in turn), with v2 "
        "shadowing a share of them, in one run:",
        "",
        "| shadow | requests | QPS | p50 ms | p99 ms | p99 / none | shadow compared / dropped | shadow overlap@10 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = res["shadow"]["0.0"]["p99_ms"]
    for k, row in res["shadow"].items():
        sh = row.get("shadow") or {}
        out.append(
            f"| {float(k):.0%} | {row['requests']} | {row['qps']:.0f} | {row['p50_ms']:.1f} | "
            f"{row['p99_ms']:.1f} | {row['p99_ms'] / base:.2f} | "
            f"{sh.get('compared', '-')} / {sh.get('dropped', '-')} | {sh.get('overlap_at_10', '-')} |"
        )
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("GRACEFUL_TORCH_THREADS", "1")
    sys.exit(main())
