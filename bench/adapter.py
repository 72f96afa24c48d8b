"""Adapter benchmark: compatibility after the fact for a new model trained without BCT.

Old model v1 (classes 0-4), new model v2-indep (classes 0-9, no BCT), and for reference v2 trained with BCT
against v1. For each adapter kind (procrustes, affine, mlp) and sample size (1k, 5k, the whole 60k train
split) an adapter version v2-indep -> v1 is fitted with ``trainer.adapt.adapt`` (what `graceful adapt` runs)
and its queries search the gallery embedded by v1 on the standard protocol (test split, queries = index % 5
== 0, gallery = the rest). Also measures the adapter's added latency per query. Writes "## Adapters" to
BENCHMARKS.md.

    .venv/bin/python -m bench.adapter
    .venv/bin/python -m bench.adapter --quick      # models of 1 epoch on a 5k slice, 1k-sample adapters; prints only

Reuses v1, v2 (BCT full) and v2-indep from bench/out/compat/full/seed0/ when that benchmark has made them
(copied next to the adapters, which must sit beside their new model); otherwise trains them with the same
settings under bench/out/adapter/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import REPO, command_line, machine_line, write_section
from trainer.adapt import AdaptConfig, adapt
from trainer.artifact import load_model, read_card
from trainer.errors import ModelCardError
from trainer.train import TrainConfig, reusable, train

KINDS = ("procrustes", "affine", "mlp")
SECTION = "Adapters"
COMPAT = REPO / "bench" / "out" / "compat" / "full" / "seed0"


def _complete(folder: Path) -> bool:
    try:
        read_card(folder)
        return True
    except ModelCardError:
        return False


def models(root: Path, args: argparse.Namespace) -> tuple[Path, str]:
    """v1, v2, v2-indep under ``root``; returns the folder and where they came from."""
    root.mkdir(parents=True, exist_ok=True)
    if not args.limit and all(_complete(COMPAT / v) for v in ("v1", "v2", "v2-indep")):
        for v in ("v1", "v2", "v2-indep"):
            src = COMPAT / v
            if not _complete(root / v) or read_card(root / v).weights_sha256 != read_card(src).weights_sha256:
                shutil.rmtree(root / v, ignore_errors=True)
                shutil.copytree(src, root / v)
        return root, f"reused from {COMPAT.relative_to(REPO)} (bench/compat.py, seed 0)"
    common = dict(seed=0, threads=args.threads, limit=args.limit)
    cfgs = [
        TrainConfig(out=str(root / "v1"), classes="0-4", epochs=args.epochs_old, **common),
        TrainConfig(out=str(root / "v2"), epochs=args.epochs_new, old=str(root / "v1"), bct="full", **common),
        TrainConfig(out=str(root / "v2-indep"), epochs=args.epochs_new, **common),
    ]
    for cfg in cfgs:
        if not reusable(cfg):
            t0 = time.perf_counter()
            train(cfg)
            print(f"trained {cfg.out} in {time.perf_counter() - t0:.0f} s", flush=True)
    return root, "trained by this benchmark with bench/compat.py's settings (seed 0)"


def latency_us(adapter_version: Path, reps: int) -> dict[str, float]:
    """Added latency of the adapter alone (embedding in, mapped unit embedding out), in microseconds per query:
    batch 1 (median over ``reps`` calls) and per query in batches of 256 (median of ``reps // 10`` calls).
    Measured on the adapter module itself, even when loading folded it into the new model (``fused``)."""
    model = load_model(adapter_version).model
    assert hasattr(model, "adapter")
    ad = model.adapter
    x1 = F.normalize(torch.randn(1, ad.cfg.in_dim), dim=1)  # (1, D_new)
    xb = F.normalize(torch.randn(256, ad.cfg.in_dim), dim=1)  # (256, D_new)

    def timed(x: torch.Tensor, n: int) -> float:
        times = []
        with torch.inference_mode():
            for _ in range(20):
                F.normalize(ad(x), dim=1)
            for _ in range(n):
                t0 = time.perf_counter_ns()
                F.normalize(ad(x), dim=1)
                times.append(time.perf_counter_ns() - t0)
        return statistics.median(times) / 1000.0 / len(x)

    return {
        "batch1_us": timed(x1, reps),
        "batch256_us_per_query": timed(xb, max(10, reps // 10)),
        "fused": bool(getattr(model, "fused", False)),
    }


def embed_latency_us(version: Path, reps: int) -> float:
    """The new model's own embedding time for one 28x28 image (batch 1, median), for scale."""
    loaded = load_model(version)
    x = loaded.preprocess(np.zeros((1, 1, 28, 28), np.uint8))
    times = []
    with torch.inference_mode():
        for _ in range(20):
            loaded.model.embed(x)
        for _ in range(reps):
            t0 = time.perf_counter_ns()
            loaded.model.embed(x)
            times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1000.0


def render(
    rows: list[dict], base: dict, lat: dict, source: str, args: argparse.Namespace, seconds: float, load: str
) -> str:
    m = base["matrix"]
    bct, nn_, oo, raw = m["v2/v1"], m["v2-indep/v2-indep"], m["v1/v1"], m["v2-indep/v1"]
    out = [
        f"## {SECTION}",
        "",
        f"Command: {command_line()}",
        "",
        machine_line(),
        f"Old model v1 (classes 0-4), new model v2-indep (classes 0-9, trained without BCT), reference v2 "
        f"(classes 0-9, BCT full against v1); models {source}. Each adapter is fitted on a seeded sample of the "
        f"Fashion-MNIST train split embedded by both models (`trainer.adapt.adapt`, what `graceful adapt` runs) "
        f"and saved as its own model version. Quality: test split, 2,000 queries (index % 5 == 0) embedded by "
        f"the query model against 8,000 gallery images embedded by v1, full ranking, cosine. "
        f"Total time {seconds / 60:.0f} min.",
        "",
        "| query model / gallery v1 | top-1 | top-5 | mAP | mAP ÷ BCT v2/v1 | mAP ÷ v2-indep/v2-indep | fit (s) |",
        "|---|---|---|---|---|---|---|",
        f"| v1 (old/old) | {oo['top1']:.4f} | {oo['top5']:.4f} | {oo['mAP']:.4f} | {oo['mAP'] / bct['mAP']:.3f} | "
        f"{oo['mAP'] / nn_['mAP']:.3f} | — |",
        f"| v2 BCT (v2/v1) | {bct['top1']:.4f} | {bct['top5']:.4f} | {bct['mAP']:.4f} | 1.000 | "
        f"{bct['mAP'] / nn_['mAP']:.3f} | — |",
        f"| v2-indep, no adapter | {raw['top1']:.4f} | {raw['top5']:.4f} | {raw['mAP']:.4f} | "
        f"{raw['mAP'] / bct['mAP']:.3f} | {raw['mAP'] / nn_['mAP']:.3f} | — |",
    ]
    for r in rows:
        c = r["cell"]
        out.append(
            f"| v2-indep + {r['kind']} adapter, {r['sample']:,} pairs | {c['top1']:.4f} | {c['top5']:.4f} | "
            f"**{c['mAP']:.4f}** | {c['mAP'] / bct['mAP']:.3f} | {c['mAP'] / nn_['mAP']:.3f} | {r['fit_s']:.1f} |"
        )
    out.append(
        f"| v2-indep/v2-indep (new/new: full re-embedding) | {nn_['top1']:.4f} | {nn_['top5']:.4f} | "
        f"{nn_['mAP']:.4f} | {nn_['mAP'] / bct['mAP']:.3f} | 1.000 | — |"
    )
    best = max(rows, key=lambda r: r["cell"]["mAP"])
    ratio = best["cell"]["mAP"] / bct["mAP"]
    out += [
        "",
        "Split by the query's class (mAP, gallery v1):",
        "",
        "| query model | old classes 0-4 | new classes 5-9 |",
        "|---|---|---|",
    ]
    for name, c in (("v1", oo), ("v2 BCT", bct), ("v2-indep, no adapter", raw)):
        out.append(f"| {name} | {c['old_classes']['mAP']:.4f} | {c['new_classes']['mAP']:.4f} |")
    for r in rows:
        c = r["cell"]
        out.append(
            f"| + {r['kind']}, {r['sample']:,} | {c['old_classes']['mAP']:.4f} | {c['new_classes']['mAP']:.4f} |"
        )
    out += [
        "",
        "Added latency per query of the adapter alone (a 128-d embedding in, the mapped unit embedding out; "
        f"torch on CPU, 1 thread; median over {args.reps} calls). For scale: the new "
        f"model embeds one image in {lat['embed_us']:.0f} µs (batch 1, same conditions). {load}",
        "",
        "| adapter | µs per query, batch 1 | µs per query, batch 256 | as served |",
        "|---|---|---|---|",
    ]
    for kind in KINDS:
        if kind in lat:
            served = (
                "0 (folded into the new model's last projection at load: same network, other weights)"
                if lat[kind]["fused"]
                else "as measured"
            )
            out.append(
                f"| {kind} | {lat[kind]['batch1_us']:.1f} | {lat[kind]['batch256_us_per_query']:.2f} | {served} |"
            )
    out += [
        "",
        f"Against the aim (best adapter's new/old mAP ≥ 0.95 × BCT's v2/v1): the best is {best['kind']} on "
        f"{best['sample']:,} pairs, {best['cell']['mAP']:.4f} = {ratio:.3f} × BCT's {bct['mAP']:.4f}: aim "
        f"{'met' if ratio >= 0.95 else '**not met**'}. Against the anchor (Drift-Adapter: 95-99% of "
        f"re-embedding quality): {best['cell']['mAP'] / nn_['mAP']:.1%} of v2-indep/v2-indep's mAP.",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", default="1000,5000,all", help="comma-separated sample sizes ('all' = 60k)")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--epochs-old", type=int, default=6, help="only when the models are trained here")
    p.add_argument("--epochs-new", type=int, default=12, help="only when the models are trained here")
    p.add_argument("--reps", type=int, default=5000, help="latency repetitions at batch 1")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="train the models on a slice (smoke runs)")
    p.add_argument(
        "--quick", action="store_true", help="1-epoch models on a 5k slice, 1k-sample adapters; prints only"
    )
    p.add_argument("--write", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "adapter")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.epochs_old, args.epochs_new, args.limit = "1000", 1, 1, args.limit or 5000
    write = (not args.quick and not args.limit) if args.write is None else args.write
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    root, source = models(args.out / ("models" if not args.limit else f"models-limit{args.limit}"), args)
    rows = []
    for kind in args.kinds.split(","):
        for s in args.samples.split(","):
            n = None if s == "all" else int(s)
            name = f"v2-indep-to-v1-{kind}-{s}"
            r = adapt(
                AdaptConfig(
                    new=str(root / "v2-indep"),
                    old=str(root / "v1"),
                    out=str(root / name),
                    kind=kind,
                    sample=n,
                    threads=args.threads,
                )
            )
            cell = r.card.metrics["matrix"][f"{name}/v1"]
            rows.append(
                {
                    "kind": kind,
                    "sample": r.card.train_config["sample_size"],
                    "cell": cell,
                    "fit_s": r.seconds,
                    "fit": r.fit,
                    "version": name,
                }
            )
            print(
                f"{name}: top1 {cell['top1']:.4f} mAP {cell['mAP']:.4f} (fit {r.seconds:.1f}s, {r.fit})",
                flush=True,
            )
    from trainer.data import load_split
    from trainer.evaluate import evaluate_models

    base = evaluate_models(
        [load_model(root / v) for v in ("v1", "v2", "v2-indep")], load_split(None, "test")
    ).to_json(include_flipped=False)
    busy = os.getloadavg()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one query at a time: one thread is the fastest for a single small matmul
    lat: dict = {"embed_us": embed_latency_us(root / "v2-indep", min(args.reps, 2000))}
    for kind in args.kinds.split(","):
        version = next(r["version"] for r in rows if r["kind"] == kind)
        lat[kind] = latency_us(root / version, args.reps)
    torch.set_num_threads(threads)
    busy_after = os.getloadavg()
    load = (
        (
            f"Load average while timing: {busy[0]:.1f} before, {busy_after[0]:.1f} after (2 cores; other "
            f"benchmarks were running: absolute µs are inflated, the ranking holds)."
        )
        if max(busy[0], busy_after[0]) > 1.5
        else f"Load average while timing: {busy[0]:.1f} before, {busy_after[0]:.1f} after (machine otherwise idle)."
    )
    (args.out / "report.json").write_text(
        json.dumps({"rows": rows, "base": base, "latency": lat}, indent=1, default=float)
    )
    text = render(rows, base, lat, source, args, time.perf_counter() - t0, load)
    print(text)
    if write:
        write_section(SECTION, text)
        print("wrote the section to BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
