"""Backfill benchmark: quality over HTTP along a progressive backfill under both order policies, backfill
throughput vs raw embedding, search latency during a backfill vs idle, predicted vs measured backfill time.

    .venv/bin/python -m bench.backfill            # full protocol; writes "## Backfill" in BENCHMARKS.md
                                                  # and the curve to bench/backfill_curve.png
    .venv/bin/python -m bench.backfill --quick    # smaller and faster; prints only
    .venv/bin/python -m bench.backfill --timing-only   # only throughput and latency ("## Backfill: throughput
                                                       # and latency"), on a quiet machine

Models: v1 and v2 (BCT) of bench/compat.py's seed 0 when present (bench/out/compat/full/seed0), else trained
here (v1: classes 0-4, 6 epochs; v2: BCT "full" against v1, 12 epochs) into bench/out/backfill/full/. One
`graceful serve` process on 127.0.0.1 per phase, each over a copy of the same ingested gallery; clients are
threads of this process.
"""

from __future__ import annotations

import argparse
import json
import shutil
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

KEY = "bench-key"
FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
POLICIES = ("sequential", "uncertainty")
PNG = REPO / "bench" / "backfill_curve.png"


def models_dir(args) -> Path:
    return v1_v2_models("backfill", args.quick)


class Phase:
    """A server over its own copy of the base data dir."""

    def __init__(self, models: Path, work: Path, base: Path | None, name: str, **env: str) -> None:
        data = work / f"data-{name}"
        if base is not None:
            shutil.copytree(base, data)
        self.server = LocalServer(
            {
                "GRACEFUL_MODELS_DIR": str(models),
                "GRACEFUL_DATA_DIR": str(data),
                "GRACEFUL_API_KEY": KEY,
                "GRACEFUL_ACTIVE_MODEL": "v1",
                "GRACEFUL_MAX_K": "10000",
                **env,
            },
            work / f"{name}.log",
        )
        self.data = data

    def __enter__(self) -> GracefulClient:
        self.server.start()
        return GracefulClient(self.server.url, KEY, timeout=600)

    def __exit__(self, *exc: object) -> None:
        rc = self.server.stop()
        if rc != 0:
            print(f"server exited with {rc}:\n{self.server.tail()}", flush=True)


def wait_job(
    c: GracefulClient, job_id: int, statuses: tuple[str, ...], poll: float = 0.05, timeout: float = 3600
) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = c.get(f"/v1/backfill/{job_id}")
        if job["status"] in statuses:
            return job
        if job["status"] == "failed" or time.monotonic() > deadline:
            raise RuntimeError(f"backfill job went wrong: {job}")
        time.sleep(poll)


def percentile(xs: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(xs), p)) if xs else float("nan")


def search_load(
    c: GracefulClient,
    payloads: list[dict],
    concurrency: int,
    seconds: float,
    until: threading.Event | None = None,
) -> dict:
    """Closed-loop searches from ``concurrency`` threads for ``seconds`` (or until ``until`` is set)."""
    lat: list[float] = []
    failures = 0
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client(n: int) -> None:
        nonlocal failures
        i = n
        while time.monotonic() < end and not (until is not None and until.is_set()):
            t0 = time.perf_counter()
            try:
                c.post("/v1/search", json=payloads[i % len(payloads)])
                ok = True
            except Exception:
                ok = False
            with lock:
                if ok:
                    lat.append(time.perf_counter() - t0)
                else:
                    failures += 1
            i += concurrency

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    wall = time.perf_counter() - t0
    return {
        "n": len(lat),
        "qps": len(lat) / wall,
        "p50_ms": 1e3 * percentile(lat, 50),
        "p99_ms": 1e3 * percentile(lat, 99),
        "failures": failures,
    }


def raw_throughput(loaded, pngs: list[bytes], batch: int) -> float:
    """Images/s of decode PNG + embed in this process, batches of ``batch`` (the backfill's own work), on the
    server's default torch threads (the job runs with those)."""
    from service.settings import Settings

    threads = torch.get_num_threads()
    torch.set_num_threads(Settings().cpu_threads)
    try:
        return _raw_throughput(loaded, pngs, batch)
    finally:
        torch.set_num_threads(threads)


def _raw_throughput(loaded, pngs: list[bytes], batch: int) -> float:
    prep = loaded.preprocess
    embed_images(loaded, np.zeros((8, *prep.shape), np.uint8))  # warm
    t0 = time.perf_counter()
    for s in range(0, len(pngs), batch):
        imgs = np.stack(
            [decode_image(p, prep=prep, max_pixels=1 << 20, what="x") for p in pngs[s : s + batch]]
        )
        embed_images(loaded, imgs)
    return len(pngs) / (time.perf_counter() - t0)


def simulate_orders(models: Path, test, q_idx: np.ndarray, g_idx: np.ndarray) -> dict[str, list[dict]]:
    """In-process, exact: the mixed-gallery quality of the same protocol under each order, including the
    uncertainty order scored by the old model's head (the alternative the service does not use)."""
    from service.backfill.curve import mixed_gallery_quality
    from service.backfill.order import margin_scores, order_by_scores

    v1, v2 = load_model(models / "v1"), load_model(models / "v2")
    old, new = embed_images(v1, test.images[g_idx]), embed_images(v2, test.images[g_idx])
    queries = embed_images(v2, test.images[q_idx])
    ids = np.arange(len(g_idx))
    orders = {
        "sequential": ids,
        "uncertainty (v2 head, the service's)": order_by_scores(ids, margin_scores(v2, old)),
        "uncertainty (v1 head)": order_by_scores(ids, margin_scores(v1, old)),
    }
    out = {}
    for name, order in orders.items():
        res = mixed_gallery_quality(
            queries, test.labels[q_idx], old, new, test.labels[g_idx], order, FRACTIONS
        )
        out[name] = [{"fraction": f, **r} for f, r in zip(FRACTIONS, res, strict=True)]
        print(f"  simulated {name}: {[round(r['mAP'], 4) for r in res]}", flush=True)
    return out


def run(args) -> dict:
    models = models_dir(args)
    test = load_split(None, "test")
    q_idx, g_idx = query_gallery_split(len(test))
    if args.quick:
        q_idx, g_idx = q_idx[:200], g_idx[:1000]
    all_q_idx = q_idx
    if args.queries:
        q_idx = q_idx[: args.queries]
    ids = [f"t{i}" for i in g_idx]
    label_of = {e: int(test.labels[i]) for e, i in zip(ids, g_idx, strict=True)}
    qimg, qlab = test.images[q_idx], test.labels[q_idx]
    res: dict = {"models": str(models.relative_to(REPO)), "queries": len(q_idx), "gallery": len(g_idx)}

    def evaluate(c: GracefulClient, what: str) -> dict:
        ev = c.evaluate(qimg, qlab, label_of, k=len(ids), threads=4)
        print(f"  {what}: {ev.metrics} ({ev.seconds:.0f}s, {ev.versions})", flush=True)
        return ev.metrics

    work = Path(tempfile.mkdtemp(prefix="graceful-backfill-bench-"))
    try:
        base = work / "data-base"
        with Phase(models, work, None, "base") as c:
            t0 = time.perf_counter()
            c.ingest_all(ids, test.images[g_idx], test.labels[g_idx], batch=256, threads=2)
            print(f"ingested {len(ids)} in {time.perf_counter() - t0:.1f}s", flush=True)
            if not args.timing_only:
                res["old_old"] = evaluate(c, "v1/v1")
            res["report"] = c.report("v2")  # before the swap: what an operator sees when deciding
            c.activate("v2")

        # Quality after each fraction, per policy: the job pauses itself at each stop point.
        res["curves"] = {}
        res["ordering_seconds"] = {}
        for policy in () if args.timing_only else POLICIES:
            print(f"policy {policy}", flush=True)
            with Phase(models, work, base, policy) as c:
                curve = []
                job = None
                for f in FRACTIONS:
                    if f > 0:
                        stop = None if f >= 1.0 else f
                        body = {"stop_at": stop} if stop else {}
                        if job is None:
                            job = c.post("/v1/backfill", json={"candidate": "v2", "policy": policy, **body})
                        else:
                            c.post(f"/v1/backfill/{job['id']}/resume", json=body)
                        job = wait_job(c, job["id"], ("paused", "done"))
                    done = job["done"] if job else 0
                    if (
                        f == 0 and res["curves"]
                    ):  # nothing re-embedded yet: the same gallery under every policy
                        curve.append(dict(next(iter(res["curves"].values()))[0]))
                        continue
                    curve.append(
                        {"fraction": f, "done": done, **evaluate(c, f"{policy} {f:.0%} ({done} items)")}
                    )
                res["curves"][policy] = curve
                res["ordering_seconds"][policy] = job["ordering_seconds"] if job else None

        if not args.timing_only:
            res["offline"] = simulate_orders(models, test, q_idx, g_idx)
            # the same exact in-process protocol over every query of the split: the HTTP curves equal the
            # in-process ones on the same queries (table below), so this is what HTTP would measure with all
            # of them, without the sampling noise of a few hundred queries
            res["offline_all"] = simulate_orders(models, test, all_q_idx, g_idx)
            res["offline_all_queries"] = len(all_q_idx)

        # Throughput: an unthrottled backfill vs raw decode + embed in this process, side by side.
        print("timing phases: throughput, then latency", flush=True)
        v2 = load_model(models / "v2")
        pngs = [encode_png(test.images[i]) for i in g_idx]
        batch = 256
        with Phase(models, work, base, "throughput") as c:
            rep = c.report("v2")
            raws = [raw_throughput(v2, pngs, batch)]
            job = c.post(
                "/v1/backfill", json={"candidate": "v2", "policy": "sequential", "batch_size": batch}
            )
            t0 = time.perf_counter()
            job = wait_job(c, job["id"], ("done",), poll=0.02)
            wall = time.perf_counter() - t0
            raws.append(raw_throughput(v2, pngs, batch))
        from service.settings import Settings

        res["raw_threads"] = Settings().cpu_threads
        res["throughput"] = {
            "raw_ips": raws,
            "backfill_ips": job["reembedded"] / job["active_seconds"],
            "active_seconds": job["active_seconds"],
            "client_wall_seconds": wall,
            "predicted_seconds": rep["predicted"]["wall_seconds"],
            "probe_ips": rep["throughput"]["images_per_second"],
        }
        print(f"throughput: {res['throughput']}", flush=True)

        # Search latency: idle, during a throttled backfill, during an unthrottled one, idle again.
        payloads = [{"image_base64": encode_png_base64(test.images[i]), "k": 10} for i in q_idx[:500]]
        secs = args.load_seconds
        # The capped job must outlast its row: at most half the gallery in the row's seconds.
        rate = max(1.0, round(min(args.rate_share * float(np.mean(raws)), 0.5 * len(ids) / secs), -1))
        lat: dict[str, dict] = {}
        with Phase(models, work, base, "latency") as c:
            search_load(c, payloads, args.concurrency, 2.0)  # warm
            lat["idle"] = search_load(c, payloads, args.concurrency, secs)
            job = c.post("/v1/backfill", json={"candidate": "v2", "policy": "sequential", "rate_limit": rate})
            lat["throttled"] = search_load(c, payloads, args.concurrency, secs)
            job = c.get(f"/v1/backfill/{job['id']}")
            lat["throttled"]["backfill_ips"] = job["rate"]
            c.post(f"/v1/backfill/{job['id']}/pause")
            wait_job(c, job["id"], ("paused",))
            time.sleep(0.5)
            lat["idle_between"] = search_load(c, payloads, args.concurrency, min(secs, 5.0))
            done = threading.Event()

            def watch() -> None:
                wait_job(c, job["id"], ("done",), poll=0.05)
                done.set()

            before = c.get(f"/v1/backfill/{job['id']}")
            c.post(f"/v1/backfill/{job['id']}/resume", json={"rate_limit": 1e9})
            watcher = threading.Thread(target=watch)
            watcher.start()
            t0 = time.perf_counter()
            lat["unthrottled"] = search_load(c, payloads, args.concurrency, secs, until=done)
            elapsed = time.perf_counter() - t0
            watcher.join()
            after = c.get(f"/v1/backfill/{job['id']}")
            lat["unthrottled"]["backfill_ips"] = (after["done"] - before["done"]) / max(elapsed, 1e-9)
            lat["idle_after"] = search_load(c, payloads, args.concurrency, min(secs, 5.0))
        res["latency"] = lat
        res["rate_limit"] = rate
        print(f"latency: {lat}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return res


def first_reaching(curve: list[dict], key: str, share: float = 0.9) -> tuple[float | None, float | None]:
    """(first measured fraction with ``share`` of the full gain, linear interpolation of the crossing)."""
    start, end = curve[0][key], curve[-1][key]
    if end <= start:
        return None, None
    target = start + share * (end - start)
    prev = curve[0]
    for p in curve[1:]:
        if p[key] >= target - 1e-12:
            x = (
                prev["fraction"]
                + (target - prev[key]) / (p[key] - prev[key]) * (p["fraction"] - prev["fraction"])
                if p[key] > prev[key]
                else p["fraction"]
            )
            return p["fraction"], x
        prev = p
    return 1.0, 1.0


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    expected = res["report"]["curve"]["policies"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, key in zip(axes, ("mAP", "top1"), strict=True):
        for policy, colour in zip(POLICIES, ("tab:blue", "tab:orange"), strict=True):
            cur = res["curves"][policy]
            ax.plot(
                [100 * p["fraction"] for p in cur],
                [p[key] for p in cur],
                "o-",
                color=colour,
                label=f"{policy} (measured over HTTP)",
            )
            if policy in expected:
                ax.plot(
                    [100 * p["fraction"] for p in expected[policy]],
                    [p["quality"][key] for p in expected[policy]],
                    "--",
                    color=colour,
                    alpha=0.6,
                    label=f"{policy} (report's expectation)",
                )
        ax.axhline(res["old_old"][key], color="grey", linestyle=":", label="v1/v1 (old/old)")
        ax.set_xlabel("% of the gallery re-embedded by v2")
        ax.set_ylabel(key)
        ax.set_title(f"{key}: v2 queries over a v1/v2 gallery")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


TIMING = "Backfill: throughput and latency"


def render(res: dict, args) -> str:
    curves, old = res["curves"], res["old_old"]
    exp = res["report"]["curve"]
    seq, unc = curves["sequential"], curves["uncertainty"]
    rows = []
    gaps: list[float] = []
    for i, f in enumerate(FRACTIONS):
        e = {
            p: {pt["fraction"]: pt["quality"]["mAP"] for pt in exp["policies"][p]}
            for p in POLICIES
            if p in exp["policies"]
        }
        ex = " / ".join(f"{e[p][f]:.4f}" if p in e and f in e[p] else "-" for p in POLICIES)
        row_gaps = [abs(e[p][f] - curves[p][i]["mAP"]) for p in POLICIES if p in e and f in e[p]]
        gaps += row_gaps
        rows.append(
            f"| {f:.0%} | {seq[i]['mAP']:.4f} | {seq[i]['top1']:.4f} | {unc[i]['mAP']:.4f} | "
            f"{unc[i]['top1']:.4f} | {ex} | {max(row_gaps) if row_gaps else float('nan'):.4f} |"
        )
    quality = res["report"].get("quality", {})
    pred_ends = [
        (name, quality.get(key, {}) or {}, cur)
        for name, key, cur in (
            ("no backfill", "no_backfill", seq[0]),
            ("full backfill", "full_backfill", seq[-1]),
        )
    ]
    end_lines = [
        f"{name}: predicted mAP {q['mAP']:.4f} vs measured {cur['mAP']:.4f} (gap {abs(q['mAP'] - cur['mAP']):.4f})"
        for name, q, cur in pred_ends
        if "mAP" in q
    ]
    worst = max(gaps) if gaps else float("nan")
    names = {"sequential": "sequential", "uncertainty": "uncertainty (v2 head, the service's)"}
    full = res.get("offline_all", {})
    gaps_all = [
        abs(pt["quality"]["mAP"] - full[names[p]][i]["mAP"])
        for p in POLICIES
        if p in exp["policies"] and names[p] in full
        for i, pt in enumerate(exp["policies"][p])
    ]
    worst_all = max(gaps_all) if gaps_all else float("nan")
    all_rows = (
        [
            f"| {f:.0%} | "
            + " | ".join(f"{full[names[p]][i]['mAP']:.4f}" for p in POLICIES if names[p] in full)
            + " |"
            for i, f in enumerate(FRACTIONS)
        ]
        if full
        else []
    )
    off = res["offline"]
    off_rows = [
        f"| {name} | "
        + " | ".join(f"{p['mAP']:.4f}" for p in cur)
        + " | "
        + f"{first_reaching(cur, 'mAP')[1]:.0%} |"
        for name, cur in off.items()
    ]
    floor_ok = all(p[k] >= old[k] for c in curves.values() for p in c for k in ("mAP", "top1"))
    lowest = {k: min(p[k] for c in curves.values() for p in c) for k in ("mAP", "top1")}
    reach = {p: first_reaching(curves[p], "mAP") for p in POLICIES}
    reach_t1 = {p: first_reaching(curves[p], "top1") for p in POLICIES}
    ords = ", ".join(f"{p} {s:.2f} s" for p, s in res["ordering_seconds"].items() if s is not None)
    lines = [
        "## Backfill",
        "",
        f"Command: {command_line()}",
        "",
        machine_line(),
        f"Models: `{res['models']}` (v1 on classes 0-4, v2 its BCT child on all classes). Protocol: "
        f"{res['queries']} query images against {res['gallery']} gallery images ingested over HTTP with v1; then v2 is "
        "activated (same space, no backfill) and a backfill job re-embeds the gallery with v2 while the server "
        "serves. Quality is measured from HTTP answers (full ranking, k = gallery size) with the job paused at "
        "each stop point (`stop_at`); each policy runs on its own copy of the same ingested gallery.",
        "",
        "### Quality along the backfill",
        "",
        "| re-embedded | sequential mAP | sequential top-1 | uncertainty-first mAP | uncertainty-first top-1 | "
        "report's expected mAP (seq / unc) | largest gap, report vs measured |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"old/old (v1/v1 over HTTP): mAP {old['mAP']:.4f}, top-1 {old['top1']:.4f}. Lowest point of either curve: "
        f"mAP {lowest['mAP']:.4f}, top-1 {lowest['top1']:.4f}: "
        + ("**never below old/old**" if floor_ok else "**below old/old at some fraction**")
        + ".",
        "",
        f"90% of the full backfill's mAP gain: uncertainty-first at the **{reach['uncertainty'][0]:.0%}** point "
        f"(interpolated {reach['uncertainty'][1]:.0%}), sequential at the **{reach['sequential'][0]:.0%}** point "
        f"(interpolated {reach['sequential'][1]:.0%}). Top-1: uncertainty-first {reach_t1['uncertainty'][0]:.0%} "
        f"(interpolated {reach_t1['uncertainty'][1]:.0%}), sequential {reach_t1['sequential'][0]:.0%} "
        f"(interpolated {reach_t1['sequential'][1]:.0%}). Computing the uncertainty order (every stored embedding "
        f"classified by v2's head, one SQL pass): {ords}.",
        "",
        f"The report's expectation (`GET /v1/backfill/report?candidate=v2`, asked before the job, method "
        f"`{exp['method']}`: {exp['sample'].get('sampled', 0)} sampled gallery items as queries, each against the "
        f"other {exp['sample'].get('gallery', 0)} gallery items re-embedded by v2 from their kept sources) is in the "
        f"second-to-last column and dashed in the plot. Largest gap to the measured curves: **{worst:.4f}** mAP "
        f"(aim ≤ 0.02: {'met' if worst <= 0.02 else 'missed'}). The report's quality cells: "
        + "; ".join(end_lines)
        + f" ({quality.get('source', 'source not given')}).",
        "",
        f"The {res['queries']} HTTP queries are a sample: mAP moves by about ±0.02 with the queries drawn. The "
        f"same curves over all {res.get('offline_all_queries', '?')} queries of the split (exact in-process "
        "rankings of the same embeddings; on the same queries they equal the HTTP ones, next table), against "
        f"which the report's largest gap is **{worst_all:.4f}** mAP (aim ≤ 0.02: "
        f"{'met' if worst_all <= 0.02 else 'missed'}):",
        "",
        "| re-embedded | sequential mAP, all queries | uncertainty-first mAP, all queries |",
        "|---|---|---|",
        *all_rows,
        "",
        f"![quality along the backfill]({PNG.relative_to(REPO).as_posix()})",
        "",
        "Which head scores the uncertainty order: the same protocol simulated in-process (exact mixed-gallery "
        "rankings on the same embeddings, no HTTP), mAP per fraction re-embedded, and where 90% of the gain is "
        "reached (interpolated). The service scores with the candidate's head (same space); the old model's "
        "head only knows classes 0-4 and cannot tell the new classes apart.",
        "",
        "| order | " + " | ".join(f"{f:.0%}" for f in FRACTIONS) + " | 90% of gain |",
        "|---|" + "---|" * (len(FRACTIONS) + 1),
        *off_rows,
        "",
        f'Throughput and search latency during a backfill: section "{TIMING}" (its own run).',
        "",
    ]
    return "\n".join(lines)


def render_timing(res: dict, args) -> str:
    tp = res["throughput"]
    raw = float(np.mean(tp["raw_ips"]))
    lat = res["latency"]
    lat_rows = []
    names = {
        "idle": "idle (before)",
        "throttled": f"backfill capped at {res['rate_limit']:.0f} items/s",
        "idle_between": "idle (job paused)",
        "unthrottled": "backfill uncapped",
        "idle_after": "idle (after)",
    }
    for key in ("idle", "throttled", "idle_between", "unthrottled", "idle_after"):
        r = lat[key]
        bf = f"{r['backfill_ips']:.0f}" if r.get("backfill_ips") else "-"
        lat_rows.append(
            f"| {names[key]} | {r['n']} | {r['qps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['p99_ms'] / lat['idle']['p99_ms']:.2f} | {bf} | {r['failures']} |"
        )
    pred, meas = tp["predicted_seconds"], tp["active_seconds"]
    lines = [
        f"## {TIMING}",
        "",
        f"Command: {command_line()}",
        "",
        machine_line(),
        f"Models: `{res['models']}`. {res['gallery']} gallery images ingested over HTTP with v1, v2 (BCT child) "
        "activated; each phase on its own `graceful serve` over a copy of that gallery, nothing else running on "
        "the machine.",
        "",
        "### Throughput and time",
        "",
        "| measure | value |",
        "|---|---|",
        f"| raw decode + embed in-process (batches of 256, the server's {res.get('raw_threads', '?')} torch thread(s); before / after the job) | "
        f"{tp['raw_ips'][0]:.0f} / {tp['raw_ips'][1]:.0f} images/s |",
        f"| backfill job, uncapped, idle server (items re-embedded / job's active seconds) | "
        f"{tp['backfill_ips']:.0f} items/s |",
        f"| backfill / raw | **{tp['backfill_ips'] / raw:.2f}** |",
        f"| predicted time (report, before the job; probe {tp['probe_ips']:.0f} images/s) | {pred:.1f} s |",
        f"| measured time (job's active seconds; client-observed {tp['client_wall_seconds']:.1f} s) | {meas:.1f} s |",
        f"| measured / predicted | **{meas / pred:.2f}** |",
        "",
        "### Search latency during a backfill",
        "",
        f"{args.concurrency} client threads search back to back (image query, k=10) for {args.load_seconds:.0f} s "
        "per row (shorter for the idle checks in between and after; the uncapped row ends when the job does).",
        "",
        "| server state | searches | QPS | p50 ms | p99 ms | p99 / idle p99 | backfill items/s | failures |",
        "|---|---|---|---|---|---|---|---|",
        *lat_rows,
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--queries", type=int, default=None, help="use the first N queries only")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--load-seconds", type=float, default=15.0)
    p.add_argument(
        "--rate-share", type=float, default=0.25, help="the capped row's rate as a share of raw throughput"
    )
    p.add_argument("--write", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--timing-only",
        action="store_true",
        help="only the throughput and latency phases (their own section; no quality curves)",
    )
    args = p.parse_args(argv)
    res = run(args)
    out = REPO / "bench" / "out" / "backfill"
    out.mkdir(parents=True, exist_ok=True)
    (out / ("timing.json" if args.timing_only else "report.json")).write_text(
        json.dumps(res, indent=1, default=float)
    )
    timing = render_timing(res, args)
    text = timing if args.timing_only else render(res, args)
    print(text if args.timing_only else text + "\n" + timing)
    write = (not args.quick) if args.write is None else args.write
    if write:
        if not args.timing_only:
            plot(res, PNG)
            write_section("Backfill", text)
        write_section(TIMING, timing)
        print(f"wrote to BENCHMARKS.md{'' if args.timing_only else f' and the curve to {PNG}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
