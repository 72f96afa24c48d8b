"""Photos benchmark: a 64x64 RGB model trained with BCT against the 28x28 grey v1 on photo-like renderings of
Fashion-MNIST, and the memory of folder training.

1. Data: scripts/render_photos.py renders a seeded slice of the train split (``--train-limit``, 20k) and the
   whole test split (10k) into a folder dataset (SYNTHETIC: see that script), once, under bench/out/photos/.
2. v1: bench/common.py's v1 (28x28 grey, classes 0-4; bench/compat.py's seed 0 when present).
3. v2-photo (and v2-photo-full): ``graceful train --data PHOTOS --size 64 --channels 3 --stem-stride 2 --old v1
   --bct plain|full --lr 0.02`` (classes 0-9, 4 epochs on 2 cores); v1 sees every training photo through its
   own contract (28x28 grey).
4. Retrieval protocol of the test split (queries: index % 5 == 0, gallery: the rest), the gallery embedded by
   v1 from the ORIGINAL 28x28 images (as a gallery founded before any photo existed), the queries being the
   RENDERED photos of the same query items: v2-photo/v1 (the new model's photo queries) against v1/v1 (v1
   embedding the same photo queries through its contract), v1/v1 on the original queries (the clean
   reference), and v2-photo/v2-photo on photos only.
5. The old model's view: decoding each file once into both contracts (what training does) against deriving
   v1's view from the new model's 64x64 view (``Preprocess.from_array``) in the training process.
6. Peak RSS of folder training at two dataset sizes (a subprocess each: ``resource.getrusage`` of the
   training process, and the sampled own memory of its loader workers): memory does not grow with the
   dataset. (bench/inputs.py measures decoding speed; the RSS of folder training is measured here.)

    .venv/bin/python -m bench.photos            # writes "## Photos" to BENCHMARKS.md
    .venv/bin/python -m bench.photos --quick    # 2k photos, 1 epoch, smaller RSS sizes; prints only
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import REPO, command_line, machine_line, v1_v2_models, write_section
from trainer.artifact import embed_images, load_model
from trainer.data import ImageFolder, default_workers, iter_views, load_split
from trainer.evaluate import embed_models
from trainer.metrics import retrieval_metrics
from trainer.train import TrainConfig, reusable, train

SECTION = "Photos"
OUT = REPO / "bench" / "out" / "photos"
METRICS = ("top1", "top5", "mAP")


def render_data(root: Path, train_limit: int) -> Path:
    """The rendered folder dataset (rendered once; reused when its manifest says the same slice)."""
    manifest = root / "manifest.csv"
    readme = root / "README.md"
    if manifest.exists() and readme.exists() and f"limit per split: {train_limit}" in readme.read_text():
        return root
    sys.path.insert(0, str(REPO / "scripts"))
    import render_photos

    print(f"rendering {train_limit} train + all test photos under {root}", flush=True)
    args = ["--out", str(root), "--limit", str(train_limit), "--workers", str(os.cpu_count() or 1)]
    if render_photos.main(args) != 0:
        raise SystemExit("rendering failed")
    return root


def photo_index(root: Path) -> dict[int, tuple[str, int]]:
    """Test-split index -> (file under test/, label) of the rendered test photos (from the manifest)."""
    by_index = {}
    with open(root / "manifest.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["split"] == "test":
                by_index[int(row["index"])] = (row["file"].removeprefix("test/"), int(row["label"]))
    return by_index


def photo_split(root: Path, indices: np.ndarray) -> ImageFolder:
    """The rendered test photos of the given test-split indices, in that order."""
    by_index = photo_index(root)
    files = np.array([by_index[int(i)][0].encode() for i in indices], dtype=np.bytes_)
    labels = np.array([by_index[int(i)][1] for i in indices], dtype=np.int64)
    names = sorted(p.name for p in (root / "test").iterdir() if p.is_dir())
    return ImageFolder(root / "test", files, labels, names)


def _cell(q, ql, g, gl, old_classes) -> dict[str, float]:
    cell = retrieval_metrics(q, ql, g, gl)
    old = np.isin(ql, old_classes)
    for name, mask in (("old_classes", old), ("new_classes", ~old)):
        cell[name] = retrieval_metrics(q[mask], ql[mask], g, gl)["mAP"]
    return cell


def retrieval(v1, news: list, photos: Path, workers: int) -> dict[str, dict]:
    test = load_split(None, "test")  # the original 28x28 images
    # the protocol over the test items that were rendered (all 10,000 unless --quick)
    rendered = np.array(sorted(photo_index(photos)), dtype=np.int64)
    q_idx, g_idx = rendered[rendered % 5 == 0], rendered[rendered % 5 != 0]
    ql, gl = test.labels[q_idx], test.labels[g_idx]
    old_classes = list(v1.card.classes)
    t0 = time.perf_counter()
    gallery_v1 = embed_images(v1, test.images[g_idx])  # v1 from the original images
    queries_v1_orig = embed_images(v1, test.images[q_idx])
    q_photos = embed_models([v1, *news], photo_split(photos, q_idx), workers=workers)
    g_photos = embed_models(news, photo_split(photos, g_idx), workers=workers)
    out: dict[str, dict] = {
        "v1/v1 (original queries)": _cell(queries_v1_orig, ql, gallery_v1, gl, old_classes),
        "v1/v1 (photo queries)": _cell(q_photos[v1.version], ql, gallery_v1, gl, old_classes),
    }
    for new in news:
        v = new.version
        out[f"{v}/v1 (photo queries)"] = _cell(q_photos[v], ql, gallery_v1, gl, old_classes)
        out[f"{v}/{v} (photos only)"] = _cell(q_photos[v], ql, g_photos[v], gl, old_classes)
    out["_protocol"] = {
        "embed_s": round(time.perf_counter() - t0, 1),
        "queries": len(q_idx),
        "gallery": len(g_idx),
    }
    return out


def old_view_cost(photos: Path, new_prep, old_prep, n: int = 512) -> dict[str, float]:
    """ms per image: decoding for the new contract alone, for both contracts at once (the extra view made
    from the decoded image in the loader), and deriving the old view from the new model's uint8 view in the
    training process (``from_array``); and how far the two old views lie apart (mean |difference| of
    pixels, 0-255)."""
    folder = load_split(photos, "train").take(n, seed=1)

    def timed(preps):
        best, views = float("inf"), None
        for _ in range(2):
            t0 = time.perf_counter()
            views = [v for v, _ in iter_views(folder, preps, 128, workers=0)]
            best = min(best, time.perf_counter() - t0)
        return best * 1000 / n, views

    one, new_views = timed([new_prep])
    both, both_views = timed([new_prep, old_prep])
    t0 = time.perf_counter()
    derived = [old_prep.from_array(v[0].numpy()) for v in new_views]
    from_array = (time.perf_counter() - t0) * 1000 / n
    diff = np.mean(
        [
            np.abs(d.astype(np.int16) - b[1].numpy().astype(np.int16)).mean()
            for d, b in zip(derived, both_views, strict=True)
        ]
    )
    return {
        "decode_new_ms": round(one, 3),
        "decode_both_ms": round(both, 3),
        "extra_view_in_loader_ms": round(both - one, 3),
        "from_array_in_trainer_ms": round(from_array, 3),
        "views_differ_by": round(float(diff), 2),
    }


# ---- peak RSS of folder training --------------------------------------------------------------------------


def _link_subset(src: Path, dst: Path, n_train: int, n_test: int) -> Path:
    """A folder dataset of ``n_train`` train and ``n_test`` test images: links to the rendered files."""
    if (dst / ".done").exists():
        return dst
    for split, n in (("train", n_train), ("test", n_test)):
        folder = load_split(src, split).take(n, seed=0)
        for i in range(len(folder)):
            rel = folder.files[i].decode()
            (dst / split / rel).parent.mkdir(parents=True, exist_ok=True)
            link = dst / split / rel
            if not link.exists():
                link.symlink_to(folder.path(i).resolve())
    (dst / ".done").write_text("")
    return dst


def _private_mib(pid: int) -> float | None:
    """A process's own memory (USS: private clean + dirty pages), MiB; None when it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            kib = sum(int(ln.split()[1]) for ln in f if ln.startswith(("Private_Clean", "Private_Dirty")))
    except (OSError, ValueError, IndexError):
        return None
    return kib / 1024


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def rss_child(args: argparse.Namespace) -> int:
    """Train on a folder once; print the peak RSS of this process (``ru_maxrss``) and the largest own
    memory (USS, sampled every 0.2 s) of any of its loader workers. A worker's ``ru_maxrss`` would count the
    pages it shares with this process since the fork: it reads as this process's size at that moment."""
    import threading

    from trainer.cli import train_main

    argv = ["--out", args.rss_out, "--data", args.rss_child, "--size", "64", "--channels", "3"]
    argv += ["--stem-stride", "2", "--epochs", "1", "--batch-size", "128", "--eval-limit", "200", "--quiet"]
    argv += ["--workers", str(args.workers), "--threads", str(args.threads), "--lr", "0.02"]
    if args.rss_old:
        argv += ["--old", args.rss_old, "--bct", "plain"]
    worker_peak, done = [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            for pid in _children(os.getpid()):
                worker_peak[0] = max(worker_peak[0], _private_mib(pid) or 0.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    rc = train_main(argv)
    done.set()
    sampler.join()
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    got = {"rc": rc, "main_mib": me, "worker_uss_mib": worker_peak[0], "worker_maxrss_mib": kids}
    print("RSS " + json.dumps({**got, "seconds": time.perf_counter() - t0}))
    return rc


def peak_rss(
    photos: Path, sizes: list[int], v1_dir: Path, workers: int, threads: int, repeats: int = 2
) -> list[dict]:
    """Each size ``repeats`` times, sizes interleaved (a run's peak moves by tens of MiB from one run to the
    next on this machine: the spread is part of the answer)."""
    runs: dict[int, list[dict]] = {n: [] for n in sizes}
    for r in range(repeats):
        for n in sizes:
            data = _link_subset(photos, OUT / "rss" / f"n{n}", n, 200)
            out = OUT / "rss" / f"model-n{n}"
            cmd = [sys.executable, "-m", "bench.photos", "--rss-child", str(data), "--rss-out", str(out)]
            cmd += ["--rss-old", str(v1_dir), "--workers", str(workers), "--threads", str(threads)]
            print(f"peak RSS: training on {n} photos in a subprocess (run {r + 1})", flush=True)
            res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("RSS ")]
            if res.returncode != 0 or not line:
                raise SystemExit(f"the RSS child failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
            runs[n].append(json.loads(line[-1][4:]))
    rows = []
    for n, got in runs.items():
        row: dict = {"images": n, "runs": got}
        for key in ("main_mib", "worker_uss_mib", "worker_maxrss_mib"):
            row[key] = [min(g[key] for g in got), max(g[key] for g in got)]
        # what an eager loader (every image decoded into memory, as before) would hold at 64x64 RGB
        row["eager_mib"] = n * 3 * 64 * 64 / 2**20
        rows.append(row)
    return rows


# ---- report -----------------------------------------------------------------------------------------------


def report(args, cfgs: dict[str, TrainConfig], cards: dict, cells, cost, rss, run=None) -> str:
    """The section's text; ``run``: the machine and command lines of the run measured (default: this one)."""
    run = run or {"machine": machine_line(), "command": command_line()}
    proto = cells["_protocol"]
    any_cfg = next(iter(cfgs.values()))
    lines = [
        f"## {SECTION}",
        "",
        run["machine"],
        f"Command: {run['command']}. Data: SYNTHETIC, `scripts/render_photos.py` (seed 0) renders each "
        "Fashion-MNIST item as a photo-like picture: 64-400 px a side, a colour tint, a textured background, "
        "a random place and scale (50-90 % of the shorter side), noise, JPEG quality 70-95 (15 % PNG), a "
        f"quarter stored turned with an EXIF orientation. {args.train_limit:,} train items (a seeded slice) "
        + ("and all 10,000 test items." if not args.quick else f"and {args.train_limit:,} test items."),
        "",
        "New models: `graceful train --data PHOTOS --size 64 --channels 3 --stem-stride 2 --old v1 --bct "
        f"RECIPE --lr {any_cfg.lr}` (resnet preset, 16 wide; ImageNet mean/std), all 10 classes, "
        f"{any_cfg.epochs} epochs of the {args.train_limit:,} photos, batch {any_cfg.batch_size}, "
        f"{any_cfg.threads} threads, {any_cfg.workers} loader worker(s). lr 0.02: in pilot runs on these photos lr "
        "0.1 (the Fashion-MNIST default) left the task loss at ln 10 for 96 steps and 0.05 for 80, 0.02 "
        "started learning within 80. "
        + "; ".join(
            f"{v}: `--bct {cfg.bct}`, {cards[v].train_config['seconds']:.0f} s "
            f"({cards[v].train_config['images_per_second']:.0f} images/s)"
            for v, cfg in cfgs.items()
        )
        + " (a shared machine: the runs' speeds differ by the load of the moment more than by the recipe, "
        "though full also runs v1 on every batch). v1 is 28x28 grey (classes 0-4, 6 epochs on the originals, "
        "bench/common.py) and sees each "
        "training photo through its own contract: a 28x28 grey view of the same decoded file.",
        "",
        f"Retrieval protocol of the test split (queries: index % 5 == 0, {proto['queries']:,}; gallery: the "
        f"other {proto['gallery']:,}), the gallery embedded by v1 from the ORIGINAL 28x28 images; the queries "
        "are the original images or the RENDERED photos of the same items:",
        "",
        "| query model / gallery model | queries | top-1 | top-5 | mAP | mAP old classes | mAP new classes |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, cell in cells.items():
        if key.startswith("_"):
            continue
        pair, _, what = key.partition(" (")
        lines.append(
            f"| {pair} | {what.rstrip(')')} | {cell['top1']:.4f} | {cell['top5']:.4f} | {cell['mAP']:.4f} | "
            f"{cell['old_classes']:.4f} | {cell['new_classes']:.4f} |"
        )
    oo, clean = cells["v1/v1 (photo queries)"], cells["v1/v1 (original queries)"]
    lines.append("")
    for v in cfgs:
        no = cells[f"{v}/v1 (photo queries)"]
        met = no["top1"] > oo["top1"] and no["mAP"] > oo["mAP"]
        lines.append(
            f"- {v} (`--bct {cfgs[v].bct}`): new/old {no['top1']:.4f} top-1, {no['mAP']:.4f} mAP against "
            f"old/old {oo['top1']:.4f}, {oo['mAP']:.4f} on the same photo queries: "
            f"{'beats it' if met else 'does NOT beat it'}. Against v1 on the clean original queries "
            f"({clean['top1']:.4f}, {clean['mAP']:.4f}): "
            f"{'above' if no['mAP'] > clean['mAP'] else 'below'}."
        )
    lines += [
        "",
        "v1 has never seen a photo: through its 28x28 grey contract it embeds them near chance (v1/v1 on photo "
        "queries), so the full recipe's pulls towards v1's class means and towards v1's embedding of each "
        "photo pull towards noise; the influence loss alone (plain) aligns the new model with v1's "
        "classifier rows, learnt on the originals the gallery was embedded from. Four epochs on 20,000 photos "
        "leave the new model weak on photos (its own top-1 above), so new/old stays far below v1 on clean "
        "queries: the compatibility holds, the photo model is what more training would improve.",
        "",
        "The old model's view during training, per image (512 train photos decoded in one process, best of "
        f"2): decoding for the new contract {cost['decode_new_ms']:.2f} ms, for both contracts at once "
        f"{cost['decode_both_ms']:.2f} ms: the second view, made from the decoded picture in the loader "
        f"worker, costs {cost['extra_view_in_loader_ms']:+.2f} ms, paid by the worker. Deriving v1's view from "
        f"the new model's 64x64 view instead (`Preprocess.from_array` on the batch) costs "
        f"{cost['from_array_in_trainer_ms']:.2f} ms on the process that trains, and is a resample of a "
        f"resample: {cost['views_differ_by']:.2f} grey levels from the view of the decoded file on average (and "
        "for an old contract of another aspect or resize policy it would show another part of the picture). "
        "Training makes both views in the loader.",
        "",
        "Peak memory of folder training (`graceful train --data FOLDER --size 64 --channels 3 --old v1 --bct "
        "plain`, 1 epoch, 1 loader worker, a subprocess each): the training process's `ru_maxrss`, and its "
        "largest loader worker's own memory (USS, sampled every 0.2 s; a worker's `ru_maxrss` counts the "
        "pages it shares with the trainer since the fork, i.e. the trainer's size at that moment):",
        "",
        "| training images | training process peak RSS, MiB | loader worker's own memory, MiB | "
        "an eager loader would add (64x64 RGB) |",
        "| --- | --- | --- | --- |",
    ]

    def span(v: list[float]) -> str:
        return f"{v[0]:.0f}-{v[1]:.0f}" if round(v[0]) != round(v[1]) else f"{v[0]:.0f}"

    for r in rss:
        lines.append(
            f"| {r['images']:,} | {span(r['main_mib'])} | {span(r['worker_uss_mib'])} | "
            f"{r['eager_mib']:.0f} MiB |"
        )
    if len(rss) >= 2:
        a, b = rss[0], rss[-1]
        lines += [
            "",
            f"Each size was run {len(a['runs'])} times (ranges: lowest-highest). "
            + ". ".join(
                f"From {x['images']:,} to {y['images']:,} images the training process's peak moves by "
                f"{y['main_mib'][0] - x['main_mib'][1]:+.0f} to {y['main_mib'][1] - x['main_mib'][0]:+.0f} MiB, "
                f"where an eager loader would add {y['eager_mib'] - x['eager_mib']:.0f} MiB"
                for x, y in zip(rss, rss[1:], strict=False)
            )
            + ". A cost per image would grow with the images added, step after step; what rises here at first "
            "does not rise again: the trainer's peak follows the steps it has run, not the images (a one-off "
            "check, not rerun by this script: 2,000 images for 4 epochs, as many steps as 8,000 for one, peaked "
            "at 602 MiB). "
            "What does grow with the dataset "
            "is the file list (one bytes array) and, with --bct, v1's embeddings of the training set for the "
            f"class means (512 bytes an image: {(b['images'] - a['images']) * 512 / 2**20:.1f} MiB more here), "
            "never the images. Evaluation holds the embeddings of the test split, not its pixels.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2k photos, 1 epoch, small RSS sizes; prints only")
    p.add_argument("--train-limit", type=int, default=20000)
    p.add_argument("--epochs", type=int, default=4)
    # plain (the influence loss alone) and full (plus pulls towards v1's class means and towards v1's embedding
    # of each photo: v1 never saw a photo, so those targets are poor here)
    p.add_argument("--recipes", default="plain,full")
    # 0.1 (the default for Fashion-MNIST) does not start learning on the photos in a few hundred steps
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--rss-sizes", default="2000,8000,20000")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--report-only", action="store_true", help="rewrite the section from the last report.json")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rss-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rss-old", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_child:
        return rss_child(args)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.train_limit, args.epochs, args.rss_sizes, args.no_write = 2000, 1, "500,2000", True
    photos = render_data(OUT / ("data-quick" if args.quick else "data"), args.train_limit)
    v1_dir = v1_v2_models("photos", quick=args.quick) / "v1"
    v1 = load_model(v1_dir)
    cfgs: dict[str, TrainConfig] = {}
    for recipe in args.recipes.split(","):
        name = ("v2-photo" if recipe == "plain" else f"v2-photo-{recipe}") + ("-quick" if args.quick else "")
        cfgs[name] = TrainConfig(
            out=str(OUT / "models" / name),
            data=str(photos),
            old=str(v1_dir),
            bct=recipe,
            size="64",
            channels=3,
            stem_stride=2,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=128,
            eval_limit=1000,
            threads=args.threads,
            workers=args.workers,
        )
    if args.report_only:
        saved = json.loads((OUT / "report.json").read_text())
        cards = {v: load_model(cfg.out).card for v, cfg in cfgs.items()}
        text = report(args, cfgs, cards, saved["cells"], saved["old_view"], saved["rss"], saved.get("run"))
        write_section(SECTION, text)
        print(text)
        return 0
    for cfg in cfgs.values():
        if not reusable(cfg):
            print(f"training {cfg.out}", flush=True)
            train(cfg)
    news = [load_model(cfg.out) for cfg in cfgs.values()]
    cards = {m.version: m.card for m in news}
    print("retrieval", flush=True)
    cells = retrieval(v1, news, photos, args.workers)
    for key, cell in cells.items():
        print(f"  {key:<44} " + "  ".join(f"{m} {cell[m]:.4f}" for m in METRICS if m in cell))
    cost = old_view_cost(photos, news[0].preprocess, v1.preprocess)
    print("  old view:", cost)
    rss = peak_rss(photos, [int(s) for s in args.rss_sizes.split(",")], v1_dir, args.workers, args.threads)
    for r in rss:
        print("  RSS", r)
    text = report(args, cfgs, cards, cells, cost, rss)
    run = {"machine": machine_line(), "command": command_line()}
    (OUT / "report.json").write_text(
        json.dumps({"cells": cells, "old_view": cost, "rss": rss, "run": run}, indent=1)
    )
    if args.no_write:
        print(text)
    else:
        write_section(SECTION, text)
        print(f"wrote ## {SECTION} to BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
