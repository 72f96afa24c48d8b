"""Gallery benchmark: add throughput, search QPS through the store vs raw FAISS, reopen time.

Usage (from the repository root)::

    .venv/bin/python -m bench.gallery            # full run; writes the "## Gallery" section of BENCHMARKS.md
    .venv/bin/python -m bench.gallery --quick    # small sanity run; prints only (add --write to record it)

What is measured, all in one process and one run so that ratios are side by side on the same noise:
- add throughput (items/s) into SQLite (WAL, synchronous=FULL) in batches, FAISS add included;
- search QPS through ``Gallery.search`` (validation, normalisation, locks, Hit objects) vs raw
  ``faiss.IndexFlatIP.search`` on the same vectors and queries, single-query and batched, store and raw
  calls interleaved call by call (order alternating), repeated; medians and per-repeat ratios reported;
- reopen time: snapshot load + reconcile vs rebuild from SQL (snapshot removed), at two sizes.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np

from bench.common import REPO, write_section
from index import Gallery, NewItem, VersionInfo

log = logging.getLogger("bench.gallery")
SECTION = "## Gallery"


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    """(n, d) float32 unit rows; generated in chunks to bound float64 temporaries."""
    rs = np.random.RandomState(seed)
    out = np.empty((n, d), dtype=np.float32)
    for i in range(0, n, 100_000):
        x = rs.randn(min(100_000, n - i), d).astype(np.float32)
        out[i : i + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def ingest(g: Gallery, x: np.ndarray, batch: int, offset: int = 0) -> float:
    """Add x in batches; returns items/s."""
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        g.add(
            [
                NewItem(f"img-{offset + i + j:08d}", v, {"n": offset + i + j})
                for j, v in enumerate(x[i : i + batch])
            ],
            "v1",
        )
    return len(x) / (time.perf_counter() - t0)


def compare_search(g: Gallery, raw: faiss.Index, q: np.ndarray, k: int, per_call: int, repeats: int) -> dict:
    """Store vs raw search on the same queries, interleaved call by call (the order alternates), so both
    see the same machine noise; per repeat, QPS of each and their ratio; medians over repeats."""
    calls = [q[i : i + per_call] for i in range(0, len(q), per_call)]
    store_fn = lambda b: g.search("v1", b, k)  # noqa: E731
    raw_fn = lambda b: raw.search(b, k)  # noqa: E731
    for b in calls[:3]:  # warm up both
        store_fn(b)
        raw_fn(b)
    s_all, r_all, ratios = [], [], []
    clock = time.perf_counter
    for rep in range(repeats):
        t_store = t_raw = 0.0
        for i, b in enumerate(calls):
            if (i + rep) % 2:
                t0 = clock()
                store_fn(b)
                t1 = clock()
                raw_fn(b)
                t2 = clock()
                t_store, t_raw = t_store + (t1 - t0), t_raw + (t2 - t1)
            else:
                t0 = clock()
                raw_fn(b)
                t1 = clock()
                store_fn(b)
                t2 = clock()
                t_raw, t_store = t_raw + (t1 - t0), t_store + (t2 - t1)
        s_all.append(len(q) / t_store)
        r_all.append(len(q) / t_raw)
        ratios.append(s_all[-1] / r_all[-1])
    return {
        "store": statistics.median(s_all),
        "raw": statistics.median(r_all),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }


def reopen_times(url: str, data_dir: Path, n: int) -> dict:
    """Time Gallery.open with the snapshot, then with it removed (rebuild from SQL)."""
    t0 = time.perf_counter()
    g = Gallery.open(url, data_dir)
    t_snap = time.perf_counter() - t0
    rep = g.last_open_reports[0]
    assert rep.snapshot_used and rep.total == n, rep
    assert g.consistency("v1") == (n, n)
    g.close()
    for p in (data_dir / "index").glob("v1.*"):
        p.unlink()
    t0 = time.perf_counter()
    g = Gallery.open(url, data_dir, snapshot_every=None)
    t_rebuild = time.perf_counter() - t0
    rep = g.last_open_reports[0]
    assert not rep.snapshot_used and rep.total == n, rep
    t0 = time.perf_counter()
    g.close()  # writes the snapshot again
    t_write = time.perf_counter() - t0
    return {"snapshot": t_snap, "rebuild": t_rebuild, "snapshot_write": t_write}


def run(args: argparse.Namespace, work: Path) -> dict:
    d, n, big = args.dim, args.n, args.big
    res: dict = {"n": n, "big": big, "d": d}
    x = unit_rows(max(n, big), d, seed=0)
    q_single = unit_rows(args.single_queries, d, seed=1)
    q_batch = unit_rows(args.batch_queries, d, seed=2)

    data_dir = work / "n"
    url = f"sqlite:///{data_dir / 'gallery.db'}"
    g = Gallery.open(url, data_dir, snapshot_every=None)
    g.register_version(VersionInfo("v1", space="v1", embedding_dim=d))
    log.info("ingesting %d vectors of d=%d in batches of %d", n, d, args.batch)
    res["add_per_s"] = ingest(g, x[:n], args.batch)
    log.info("add: %.0f items/s", res["add_per_s"])

    raw = faiss.IndexFlatIP(d)
    raw.add(x[:n])
    log.info(
        "search: %d single queries, %d batched (batches of %d), %d repeats",
        len(q_single),
        len(q_batch),
        args.batch_size,
        args.repeats,
    )
    res["single"] = compare_search(g, raw, q_single, args.k, 1, args.repeats)
    log.info("single-query: %s", res["single"])
    res["batched"] = compare_search(g, raw, q_batch, args.k, args.batch_size, args.repeats)
    log.info("batched: %s", res["batched"])
    # same answers, as a sanity check of the comparison
    _, want = raw.search(q_batch[:20], args.k)
    got = g.search("v1", q_batch[:20], args.k)
    assert all([int(h.external_id[4:]) for h in row] == list(w) for row, w in zip(got, want, strict=True))
    t0 = time.perf_counter()
    g.close()
    res["snapshot_write_n"] = time.perf_counter() - t0
    del raw
    res["reopen_n"] = reopen_times(url, data_dir, n)
    log.info("reopen at %d: %s", n, res["reopen_n"])

    if big:
        data_dir = work / "big"
        url = f"sqlite:///{data_dir / 'gallery.db'}"
        g = Gallery.open(url, data_dir, snapshot_every=None)
        g.register_version(VersionInfo("v1", space="v1", embedding_dim=d))
        log.info("ingesting %d vectors in batches of %d", big, args.big_batch)
        res["add_per_s_big"] = ingest(g, x[:big], args.big_batch)
        log.info("add (big): %.0f items/s", res["add_per_s_big"])
        g.close()
        res["reopen_big"] = reopen_times(url, data_dir, big)
        log.info("reopen at %d: %s", big, res["reopen_big"])
    return res


def fmt_n(n: int) -> str:
    return (
        f"{n:.0e}".replace("e+0", "e") if n >= 10_000 and str(n).rstrip("0") in ("1", "2", "5") else f"{n:,}"
    )


def render(res: dict, args: argparse.Namespace, command: str) -> str:
    s, b = res["single"], res["batched"]
    lines = [
        SECTION,
        "",
        f"Command: `{command}`",
        "",
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.machine()} with {os.cpu_count()} CPUs "
        f"(shared, noisy), Python {platform.python_version()}, faiss {faiss.__version__} "
        f"[{faiss.get_compile_options().strip()}] ({faiss.omp_get_max_threads()} OpenMP thread(s), both sides), numpy {np.__version__}. "
        f"Random unit vectors, d={res['d']}, k={args.k}, index factory `Flat` (exact, inner product). "
        "SQLite file in WAL mode with synchronous=FULL (every commit fsynced).",
        "",
        "| measure | value |",
        "|---|---|",
        f"| add throughput at {fmt_n(res['n'])} (batches of {args.batch}, SQL commit + FAISS add) "
        f"| {res['add_per_s']:,.0f} items/s |",
    ]
    if res["big"]:
        lines.append(
            f"| add throughput to {fmt_n(res['big'])} (batches of {args.big_batch}) "
            f"| {res['add_per_s_big']:,.0f} items/s |"
        )
    lines += [
        f"| single-query QPS at {fmt_n(res['n'])}: store / raw faiss | {s['store']:,.0f} / {s['raw']:,.0f} "
        f"= **{s['ratio']:.3f}** (per-repeat {s['ratio_min']:.3f}-{s['ratio_max']:.3f}) |",
        f"| batched QPS at {fmt_n(res['n'])} (batches of {args.batch_size}): store / raw faiss "
        f"| {b['store']:,.0f} / {b['raw']:,.0f} = **{b['ratio']:.3f}** "
        f"(per-repeat {b['ratio_min']:.3f}-{b['ratio_max']:.3f}) |",
    ]
    for key, n in (("reopen_n", res["n"]), ("reopen_big", res["big"])):
        if key in res:
            r = res[key]
            lines.append(
                f"| reopen at {fmt_n(n)}: snapshot load + reconcile / rebuild from SQL "
                f"| {r['snapshot']:.2f} s / {r['rebuild']:.2f} s (snapshot write {r['snapshot_write']:.2f} s) |"
            )
    lines += [
        "",
        f"QPS figures are medians of {args.repeats} repeats ({args.single_queries} single queries, "
        f"{args.batch_queries} batched queries per repeat); within a repeat store and raw calls alternate call by "
        "call (order flipping each call), and the ratio is the median of per-repeat ratios. "
        "Store search = validation + normalisation + read lock + FAISS + id lookup + `Hit` objects; raw = "
        "`faiss.IndexFlatIP.search` on the same normalised vectors. Reopen times are `Gallery.open` with a warm OS "
        "page cache: the snapshot path reads the FAISS file and the id lookup, count-checks SQL and replays what "
        "is above the watermark (here nothing); the rebuild path reads every row and vector from SQL. "
        "The machine was shared with other jobs while this ran; compare the ratios, not the absolute QPS.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sanity run (1e4 / 5e4 vectors, 3 repeats)")
    p.add_argument("--n", type=int, default=100_000, help="vectors for add and search figures")
    p.add_argument(
        "--big", type=int, default=1_000_000, help="vectors for the second reopen figure (0: skip)"
    )
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch", type=int, default=1000, help="items per add call")
    p.add_argument("--big-batch", type=int, default=10_000, help="items per add call for --big")
    p.add_argument("--single-queries", type=int, default=200)
    p.add_argument("--batch-queries", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=100, help="queries per batched search call")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="FAISS OpenMP threads for both sides (1: the setting for concurrent single-query serving, "
        "and stable on a shared machine)",
    )
    p.add_argument("--workdir", type=Path, default=None, help="where the databases go (default: a temp dir)")
    p.add_argument(
        "--write",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write the section into BENCHMARKS.md (default: yes unless --quick)",
    )
    p.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.big, args.repeats = min(args.n, 10_000), min(args.big, 50_000), 3
        args.single_queries, args.batch_queries = 100, 500
    write = (not args.quick) if args.write is None else args.write
    faiss.omp_set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("index").setLevel(logging.WARNING)
    command = " ".join([".venv/bin/python", "bench/gallery.py", *map(shlex.quote, argv or sys.argv[1:])])

    work = Path(tempfile.mkdtemp(prefix="gallery-bench-", dir=args.workdir))
    try:
        res = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    section = render(res, args, command)
    print(section)
    if write:
        write_section(SECTION.removeprefix("## "), section, args.out)
        log.info("wrote %s to %s", SECTION, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
