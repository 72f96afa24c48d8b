"""Scale-out benchmark: backfill throughput of the local engine vs the Ray engine with 1 and 2 workers, on the
same cores.

    .venv/bin/python -m bench.scaleout                       # 20,000 items, 2 cores; writes "## Scale-out"
    .venv/bin/python -m bench.scaleout --items 60000 --threads 4
    .venv/bin/python -m bench.scaleout --items 300 --quick   # a smoke run; prints only

A gallery of N Fashion-MNIST images (train then test split) is ingested once, embedded by v1 with its sources
kept; each phase then backfills a copy of it with v2 (the BCT child) through the service's own runner, in this
process: the local engine (torch on T threads), then Ray with 1 and with 2 actors (one torch thread each) on a
local cluster of T CPUs. The process (and so the Ray cluster it starts) is pinned to the first T cores, so
every phase gets the same cores. Times are wall clock from creating the job to ``done``; Ray's include starting
its actor pool (each actor imports torch and loads the model) once per dataset of up to 50,000 items.
Models: v1 and v2 as bench/common.py's ``v1_v2_models`` finds or trains them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import command_line, machine_line, v1_v2_models, write_section

SECTION = "Scale-out"


def _num(x: float, fmt: str) -> str:
    """``x`` formatted, or "-" when not measured (a job written in one go has no rate after its first write)."""
    return "-" if x != x else format(x, fmt)


def images(n: int) -> np.ndarray:
    """The first ``n`` Fashion-MNIST images, train split then test split: (n, 1, 28, 28) uint8."""
    from trainer.data import load_split

    out, have = [], 0
    for split in ("train", "test"):
        ds = load_split(None, split)
        take = min(n - have, len(ds))
        out.append(np.asarray(ds.images[:take]))
        have += take
        if have >= n:
            break
    if have < n:
        raise SystemExit(f"Fashion-MNIST holds {have} images, fewer than --items {n}")
    return np.concatenate(out)


def _parts(models: Path, data: Path) -> tuple[Any, Any, Any, Any]:
    from index import Gallery
    from service.blobs import BlobStore
    from service.models.cache import ModelCache
    from service.models.hot_swap import HotSwap
    from service.models.registry import ModelRegistry

    gallery = Gallery.open(None, data)
    registry = ModelRegistry(models, gallery)
    registry.scan()
    cache = ModelCache(registry)
    swap = HotSwap(registry, cache)
    swap.activate("v1")
    return gallery, swap, cache, BlobStore(data / "blobs")


def build_base(models: Path, imgs: np.ndarray, data: Path) -> None:
    """The gallery every phase starts from: ``g{i}`` embedded by v1, sources kept (under ``data``)."""
    from index import NewItem
    from service.images import encode_png

    gallery, swap, _, blobs = _parts(models, data)
    try:
        for s in range(0, len(imgs), 2000):
            chunk = imgs[s : s + 2000]
            vecs = swap.active.embed(chunk)
            gallery.add(
                [
                    NewItem(f"g{s + i}", v, source_uri=blobs.put(encode_png(im)))
                    for i, (im, v) in enumerate(zip(chunk, vecs, strict=True))
                ],
                "v1",
            )
    finally:
        gallery.close()


def run_phase(models: Path, base: Path, work: Path, name: str, engine: str, workers: int | None) -> dict:
    """Backfill a copy of the base gallery with v2 on ``engine``; the job's wall time and rate."""
    from service.backfill.ray_engine import RayOptions
    from service.backfill.runner import BackfillRunner

    data = work / name
    shutil.copytree(base, data)
    gallery, swap, cache, blobs = _parts(models, data)
    runner = BackfillRunner(
        gallery, swap, cache, blobs, batch_size=256, idle_poll_s=0.05, ray=RayOptions(workers=workers or 1)
    )
    runner.start()
    try:
        t0 = time.perf_counter()
        job = runner.create("v2", engine=engine, workers=workers)
        first: tuple[float, int] | None = None  # (seconds, items done) when the first batch was written
        while (state := runner.describe(job.id))["status"] in ("pending", "running"):
            if first is None and state["done"] > 0:
                first = (time.perf_counter() - t0, state["done"])
            time.sleep(0.02)
        wall = time.perf_counter() - t0
    finally:
        runner.stop()
        gallery.close()
        shutil.rmtree(data, ignore_errors=True)
    if state["status"] != "done":
        raise RuntimeError(f"{name}: the job ended {state['status']}: {state.get('error')}")
    n = state["done"]
    t_first, n_first = first or (wall, n)
    # the rate once the first batch is written: without starting the pool (Ray) or the first read (local)
    after = (n - n_first) / (wall - t_first) if wall > t_first and n > n_first else float("nan")
    print(
        f"{name}: {n} items in {wall:.2f}s = {n / wall:.0f} items/s; first write after {t_first:.2f}s, "
        f"{after:.0f} items/s after it; {state['seconds_by_stage']}",
        flush=True,
    )
    return {
        "name": name,
        "engine": engine,
        "workers": workers,
        "items": n,
        "wall": wall,
        "rate": n / wall,
        "first": t_first,
        "after": after,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=20_000, help="gallery items (default %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="cores every phase runs on (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="quick models; print only, write nothing")
    args = p.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    if args.threads > len(cores):
        raise SystemExit(f"--threads {args.threads}: this process may use {len(cores)} cores")
    os.sched_setaffinity(0, cores[: args.threads])  # Ray's processes inherit it: the same cores for all
    import ray
    import torch

    torch.set_num_threads(args.threads)
    models = v1_v2_models("scaleout", args.quick)
    imgs = images(args.items)
    with tempfile.TemporaryDirectory(prefix="scaleout-") as tmp:
        work = Path(tmp)
        shutil.copytree(models / "v1", work / "models" / "v1")
        shutil.copytree(models / "v2", work / "models" / "v2")
        t0 = time.perf_counter()
        build_base(work / "models", imgs, work / "base")
        print(f"gallery of {args.items} items built in {time.perf_counter() - t0:.1f}s", flush=True)
        rows = [run_phase(work / "models", work / "base", work, "local", "local", None)]
        ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
        try:
            for w in (1, 2):
                rows.append(run_phase(work / "models", work / "base", work, f"ray x{w}", "ray", w))
        finally:
            ray.shutdown()
    local, one, two = rows
    lines = [
        f"| {r['name']} | {r['workers'] or '-'} | {r['items']} | {r['wall']:.2f} | {r['rate']:.0f} | "
        f"{r['rate'] / local['rate']:.2f} | {r['first']:.2f} | {_num(r['after'], '.0f')} | "
        f"{_num(r['after'] / local['after'], '.2f')} |"
        for r in rows
    ]
    capped = f" (2 workers asked; a cluster of {args.threads} CPUs runs {min(2, args.threads)})"
    body = "\n".join(
        [
            f"## {SECTION}",
            "",
            "Backfill of a gallery of Fashion-MNIST images with v2 (the BCT child of v1) through the service's "
            "runner: the local engine (torch on all the cores) vs the Ray engine (`--engine ray`, a Ray Data "
            "actor pool, one torch thread per actor; the service's thread writes every batch). Every phase runs "
            f"on the same {args.threads} cores (the process and its Ray cluster pinned to them). Wall time from "
            "creating the job to done; Ray's includes starting its actor pool (each actor imports torch and "
            "loads the model) once per dataset of up to 50,000 items.",
            "",
            machine_line(),
            f"Command: {command_line()}",
            "",
            "| engine | workers | items | wall s | items/s | vs local | first write s | items/s after it "
            "| vs local |",
            "|---|---|---|---|---|---|---|---|---|",
            *lines,
            "",
            "*first write s*: from creating the job to its first committed batch (Ray: the actor pool "
            "starting); *items/s after it*: the rest of the job, a steady rate.",
            "",
            f"Ray with 2 workers vs 1: x{two['rate'] / one['rate']:.2f} overall, "
            f"x{_num(two['after'] / one['after'], '.2f')} after the first write"
            + (capped if args.threads < 2 else "")
            + "; the cost report's `workers=N` prediction assumes xN (the measured single-worker rate x N).",
        ]
    )
    print(body)
    if not args.quick:
        write_section(SECTION, body)
        print(f"wrote ## {SECTION} in BENCHMARKS.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
