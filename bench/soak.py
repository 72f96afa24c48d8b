"""Soak: minutes of mixed search, ingest, delete and hot swaps against one server on loopback.

    .venv/bin/python -m bench.soak --minutes 10     # writes "## Soak" in BENCHMARKS.md
    .venv/bin/python -m bench.soak --minutes 1 --no-write

Clients (threads, keep-alive) run a mix of image / vector / item searches, ingests of 1-32 new images and
deletes of items they ingested, while the active model swaps v1 ⇄ v2 ``--swaps`` times at even intervals.
Passes when no request failed (every answer 2xx, every search answered by v1 or v2), the server's memory is
flat (RSS sampled from /proc; start = after the warm-up), and at the end the database and the index agree:
FAISS's live count == SQL's item count == the items the clients know they left stored (2,000 of them, sampled,
are each found by id). Models: ``--models``, else bench/out/compat/full/seed0 when present, else bench/service.py's quick
ones.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from bench.common import REPO, command_line, machine_line, write_section
from service.console.client import ApiError, GracefulClient
from service.console.local_server import LocalServer
from service.images import encode_png_base64
from trainer.artifact import embed_images, load_model
from trainer.data import load_split

KEY = "soak-key"


def rss_mb(pid: int) -> float:
    """Resident set size of a process, MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Soak:
    def __init__(self, url: str, images: np.ndarray, vectors: np.ndarray, seed: int, target: int) -> None:
        self.client = GracefulClient(url, KEY, timeout=60)
        self.pngs = [encode_png_base64(im) for im in images]
        self.vectors = vectors  # v1 embeddings of the same images, for searches by vector
        self.lock = threading.Lock()
        self.live: list[str] = []  # ids ingested and not deleted (by this run)
        self.counts: Counter[str] = Counter()
        self.versions: Counter[str] = Counter()
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.seed = seed
        self.target = target  # the gallery is held around this size: ingests above it turn into deletes
        self.next_id = 0

    def _new_ids(self, n: int) -> list[str]:
        with self.lock:
            ids = [f"s{self.next_id + i}" for i in range(n)]
            self.next_id += n
        return ids

    def _fail(self, what: str, e: Exception) -> None:
        with self.lock:
            self.failures.append(f"{what}: {e}")

    def ingest(self, rng: random.Random, n: int) -> None:
        ids = self._new_ids(n)
        items = [
            {"external_id": e, "image_base64": self.pngs[rng.randrange(len(self.pngs))], "metadata": {"n": i}}
            for i, e in enumerate(ids)
        ]
        self.client.post("/v1/items", json={"items": items})
        with self.lock:
            self.live.extend(ids)

    def worker(self, n: int) -> None:
        rng = random.Random(self.seed * 1000 + n)
        while not self.stop.is_set():
            op = rng.choices(["image", "vector", "item", "ingest", "delete"], weights=[50, 15, 10, 15, 10])[0]
            if op == "ingest" and len(self.live) > self.target:
                op = "delete"
            try:
                if op == "image":
                    r = self.client.post(
                        "/v1/search", json={"image_base64": self.pngs[rng.randrange(len(self.pngs))], "k": 10}
                    )
                    if r["model_version"] not in ("v1", "v2") or len(r["hits"]) != 10:
                        raise AssertionError(f"odd answer: {r['model_version']}, {len(r['hits'])} hits")
                    with self.lock:
                        self.versions[r["model_version"]] += 1
                elif op == "vector":
                    v = self.vectors[rng.randrange(len(self.vectors))]
                    self.client.post(
                        "/v1/search",
                        json={
                            "vector": v.tolist(),
                            "model_version": "v1",
                            "k": 10,
                            "include_metadata": False,
                        },
                    )
                elif op == "item":
                    with self.lock:
                        eid = self.live[rng.randrange(len(self.live))] if self.live else None
                    if eid is None:
                        continue
                    try:
                        self.client.post("/v1/search", json={"item_id": eid, "k": 5})
                    except ApiError as e:  # deleted by another client meanwhile: not a failure
                        with self.lock:
                            gone = eid not in self.live
                        if not (e.status == 404 and gone):
                            raise
                elif op == "ingest":
                    self.ingest(rng, rng.randint(1, 32))
                else:
                    with self.lock:
                        if len(self.live) < 500:
                            continue
                        eid = self.live.pop(rng.randrange(len(self.live)))
                    r = self.client.http.delete(f"/v1/items/{eid}")
                    if r.status_code != 200:
                        raise ApiError(r.status_code, r.text)
                with self.lock:
                    self.counts[op] += 1
            except Exception as e:  # every failure is counted and reported, the load goes on
                self._fail(op, e)


def run(args) -> dict:
    from bench.service import models_dir

    # Quality does not matter here, only the two compatible versions: the compat benchmark's seed-0 models
    # when present, else bench/service.py's quick ones (trained in a minute if missing).
    models = Path(args.models) if args.models else models_dir(argparse.Namespace(quick=True))
    compat = REPO / "bench" / "out" / "compat" / "full" / "seed0"
    if not args.models and (compat / "v1" / "card.json").exists() and (compat / "v2" / "card.json").exists():
        models = compat
    test = load_split(None, "test")
    rng = np.random.default_rng(0)
    pick = rng.choice(len(test.images), size=500, replace=False)
    v1 = load_model(models / "v1")
    vectors = embed_images(v1, test.images[pick])
    work = Path(tempfile.mkdtemp(prefix="graceful-soak-"))
    res: dict = {
        "models": str(models.relative_to(REPO)),
        "minutes": args.minutes,
        "clients": args.clients,
        "swaps_planned": args.swaps,
        "target": args.items,
    }
    try:
        server = LocalServer(
            {
                "GRACEFUL_MODELS_DIR": str(models),
                "GRACEFUL_DATA_DIR": str(work / "data"),
                "GRACEFUL_API_KEY": KEY,
                "GRACEFUL_ACTIVE_MODEL": "v1",
            },
            work / "server.log",
        ).start()
        try:
            soak = Soak(server.url, test.images[pick], vectors, seed=0, target=args.items)
            boot = random.Random(1)
            for _ in range(40):  # a starting gallery of 2,000 items
                soak.ingest(boot, 50)
            threads = [
                threading.Thread(target=soak.worker, args=(n,), daemon=True) for n in range(args.clients)
            ]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            total = args.minutes * 60
            warmup = min(30.0, total / 10)
            rss: list[tuple[float, float, int]] = []  # (seconds, MB, items the clients hold)
            swaps, swap_s = 0, []
            next_swap = total / (args.swaps + 1)
            next_rss = 0.0
            while (now := time.monotonic() - t0) < total:
                if now >= next_rss:
                    rss.append((now, rss_mb(server.pid), len(soak.live)))
                    next_rss += 10
                if swaps < args.swaps and now >= next_swap:
                    target = "v2" if swaps % 2 == 0 else "v1"
                    try:
                        swap_s.append(soak.client.activate(target)["seconds"])
                        swaps += 1
                    except Exception as e:
                        soak._fail(f"activate {target}", e)
                    next_swap += total / (args.swaps + 1)
                time.sleep(0.2)
            soak.stop.set()
            for t in threads:
                t.join(120)
            elapsed = time.monotonic() - t0
            rss.append((elapsed, rss_mb(server.pid), len(soak.live)))
            # The end state: DB == index == what the clients left stored.
            c = soak.client
            spaces = {s["space"]: s for s in c.get("/v1/index")["spaces"]}
            metrics = c.http.get("/metrics").text
            sql_items = int(
                float(
                    next(
                        ln.split()[-1]
                        for ln in metrics.splitlines()
                        if ln.startswith("graceful_gallery_items ")
                    )
                )
            )
            sample = random.Random(2).sample(soak.live, min(2000, len(soak.live)))
            missing = [e for e in sample if c.http.get(f"/v1/items/{e}").status_code != 200]
            # memory is compared from when the gallery first reached its steady size (after the warm-up)
            steady = [(t, m) for t, m, n in rss if t >= warmup and n >= args.items]
            start = steady[0] if steady else (rss[-1][0], rss[-1][1])
            res.update(
                {
                    "seconds": elapsed,
                    "requests": dict(soak.counts),
                    "total_requests": sum(soak.counts.values()),
                    "failures": soak.failures[:20],
                    "failed": len(soak.failures),
                    "swaps": swaps,
                    "swap_s_median": float(np.median(swap_s)) if swap_s else None,
                    "versions": dict(soak.versions),
                    "rss_start_mb": start[1],
                    "rss_start_s": start[0],
                    "rss_end_mb": rss[-1][1],
                    "rss_max_mb": max(m for _, m, _ in rss),
                    "rss_series": rss,
                    "faiss_live": spaces["v1"]["live"],
                    "sql_items": sql_items,
                    "client_items": len(soak.live),
                    "missing": len(missing),
                    "checked": len(sample),
                }
            )
        finally:
            res["server_exit"] = server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return res


def render(res: dict) -> str:
    agree = res["faiss_live"] == res["sql_items"] == res["client_items"] and res["missing"] == 0
    ok = res["failed"] == 0 and agree and res["swaps"] == res["swaps_planned"]
    growth = res["rss_end_mb"] - res["rss_start_mb"]
    reqs = ", ".join(f"{k} {v:,}" for k, v in sorted(res["requests"].items()))
    lines = [
        "## Soak",
        "",
        f"Command: {command_line()}",
        "",
        machine_line(),
        f"One `graceful serve` on 127.0.0.1 (default settings, models `{res['models']}`), {res['clients']} client "
        f"threads for {res['seconds'] / 60:.1f} min: searches by image, vector and item id, ingests of 1-32 new "
        f"images, deletes of items they ingested, and {res['swaps_planned']} hot swaps v1 ⇄ v2 at even intervals. "
        f"Started from a gallery of 2,000 ingested images; ingests stop while the clients hold more than "
        f"{res['target']:,} items (deletes go on), so the gallery soon holds steady around that size and memory "
        "can be compared.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| result | **{'PASS' if ok else 'FAIL'}** |",
        f"| requests | {res['total_requests']:,} ({reqs}) |",
        f"| failed requests | **{res['failed']}** |",
        f"| swaps done | {res['swaps']} (median {res['swap_s_median']:.3f} s server-side) |",
        f"| image searches answered by | {res['versions']} |",
        f"| server RSS once the gallery is steady (at {res['rss_start_s'] / 60:.1f} min) → end (max) | "
        f"{res['rss_start_mb']:.0f} MB → {res['rss_end_mb']:.0f} MB ({growth:+.0f} MB; max {res['rss_max_mb']:.0f} MB) |",
        f"| items at the end: FAISS live / SQL / clients' own count | {res['faiss_live']:,} / {res['sql_items']:,} / "
        f"{res['client_items']:,} ({'agree' if agree else '**disagree**'}; {res['missing']} of {res['checked']:,} sampled "
        "ids not found) |",
        "",
        "RSS every 30 s (MB): " + ", ".join(f"{m:.0f}" for _, m, _ in res["rss_series"][::3]) + ".",
    ]
    if res["failures"]:
        lines += ["", "First failures:", *[f"- `{f[:200]}`" for f in res["failures"]]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--swaps", type=int, default=20)
    p.add_argument(
        "--items", type=int, default=20_000, help="gallery size held steady (ingests pause above it)"
    )
    p.add_argument("--models", help="folder with model versions v1 and v2 (v2 a BCT child of v1)")
    p.add_argument("--write", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    res = run(args)
    text = render(res)
    print(text)
    if args.write:
        write_section("Soak", text)
        print("wrote the section to BENCHMARKS.md")
    return 0 if res["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
