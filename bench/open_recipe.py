"""Open-world BCT recipe search: variants of v2 against a v1 whose gallery holds classes neither model saw.

One split (default 0-3:0-5: v1 on classes 0-3, v2 on 0-5, classes 6-9 unseen by both) and seed; each
``--variant NAME:KEY=VALUE,...`` trains a v2 with ``--bct full`` plus the given TrainConfig fields and prints
its figures split by the query's class (old / new / unseen); every run is appended to
bench/out/open_recipe/results.jsonl and ``--table`` writes them to BENCHMARKS.md. ``--ceilings`` measures,
with no training, what queries built from v1 itself reach against v1's gallery (v1's own embedding, the
mean of its neighbours among unlabeled images, averaged augmentations): the targets the unlabeled pull can
copy.

    .venv/bin/python -m bench.open_recipe --variant full-alone \\
        --variant "warm:init_from_old=True,lr=0.02,unlabeled=/usr/share/datasets/fashion-mnist,unlabeled_limit=20000"
    .venv/bin/python -m bench.open_recipe --ceilings
    .venv/bin/python -m bench.open_recipe --table
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, command_line, machine_line, write_section
from trainer.artifact import embed_images, load_model
from trainer.data import DEFAULT_DATA_DIR, load_split, parse_classes, query_gallery_split
from trainer.evaluate import evaluate_models
from trainer.metrics import retrieval_metrics
from trainer.train import TrainConfig, reusable, train

OUT = REPO / "bench" / "out" / "open_recipe"
RESULTS = OUT / "results.jsonl"
PARTS = ("old_classes", "new_classes", "unseen_classes")
TEXT_FIELDS = {"unlabeled", "unlabeled_target", "new_rows", "pulls_on", "pc", "arch"}


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME:key=value,...`` -> (NAME, TrainConfig fields); values are Python literals except paths/names."""
    name, _, rest = spec.partition(":")
    fields: dict[str, Any] = {}
    for part in filter(None, rest.split(",")):
        key, _, value = part.partition("=")
        fields[key] = value if key in TEXT_FIELDS else ast.literal_eval(value)
    return name, fields


def row(cell: dict) -> dict[str, float]:
    out = {"top1": cell["top1"], "mAP": cell["mAP"]}
    for p in PARTS:
        if p in cell:
            out[f"{p}.top1"], out[f"{p}.mAP"] = cell[p]["top1"], cell[p]["mAP"]
    return out


def run_variant(args: argparse.Namespace, name: str, fields: dict[str, Any], test) -> dict:
    old_c, new_c = args.split.split(":")
    root = OUT / args.split.replace(":", "_") / f"seed{args.seed}"
    v1 = TrainConfig(
        out=str(root / "v1"), classes=old_c, epochs=args.epochs_old, seed=args.seed, threads=args.threads
    )
    if not reusable(v1):
        train(v1)
    cfg = TrainConfig(
        out=str(root / name),
        classes=new_c,
        epochs=args.epochs_new,
        seed=args.seed,
        threads=args.threads,
        old=v1.out,
        bct="full",
        **fields,
    )
    t0 = time.perf_counter()
    if not reusable(cfg):
        train(cfg)
    m = evaluate_models([load_model(v1.out), load_model(cfg.out)], test).matrix
    rec = {
        "variant": name,
        "split": args.split,
        "seed": args.seed,
        "epochs": [args.epochs_old, args.epochs_new],
        "fields": fields,
        "seconds": round(time.perf_counter() - t0),
        "v1/v1": row(m["v1/v1"]),
        "v2/v1": row(m[f"{name}/v1"]),
        "v2/v2": row(m[f"{name}/{name}"]),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def ceilings(args: argparse.Namespace, test) -> list[tuple[str, dict[str, float]]]:
    """Queries made from v1 alone against v1's gallery (no training)."""
    old_c, new_c = args.split.split(":")
    v1 = load_model(OUT / args.split.replace(":", "_") / f"seed{args.seed}" / "v1")
    known = set(parse_classes(old_c)) | set(parse_classes(new_c))
    q, g = query_gallery_split(len(test))
    ql, gl = test.labels[q], test.labels[g]
    unseen = ~np.isin(ql, sorted(known))
    emb = embed_images(v1, test.images)
    unl = embed_images(
        v1, load_split(args.unlabeled, "train").take(args.unlabeled_limit, seed=args.seed).images
    )

    def measure(queries: np.ndarray) -> dict[str, float]:
        a = retrieval_metrics(queries, ql, emb[g], gl)
        u = retrieval_metrics(queries[unseen], ql[unseen], emb[g], gl)
        return {
            "top1": a["top1"],
            "mAP": a["mAP"],
            "unseen_classes.top1": u["top1"],
            "unseen_classes.mAP": u["mAP"],
        }

    def norm(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    out = [("v1's own embedding (v1/v1)", measure(emb[q]))]
    order = np.argsort(-(emb[q] @ unl.T), axis=1)
    for k in (5, 10, 20):
        out.append(
            (f"mean of v1's {k} nearest unlabeled neighbours", measure(norm(unl[order[:, :k]].mean(1))))
        )
    x = test.images[q]
    views = [x, x[..., ::-1], *(np.roll(x, s, axis=a) for s in (1, -1) for a in (2, 3))]
    out.append(
        (
            "v1 averaged over flip + 4 one-pixel shifts",
            measure(norm(np.mean([embed_images(v1, np.ascontiguousarray(v)) for v in views], 0))),
        )
    )
    return out


def fmt(r: dict[str, float], key: str) -> str:
    return f"{r[key]:.4f}" if key in r else "-"


def table(ceiling_rows: list[tuple[str, dict[str, float]]] | None) -> str:
    recs = (
        [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
        if RESULTS.exists()
        else []
    )
    out = [
        "## Open-world recipe search",
        "",
        f"Command: {command_line()} (one `--variant` per run; `--table` rewrites this section from "
        "bench/out/open_recipe/results.jsonl)",
        "",
        machine_line(),
        "Each row: a v2 trained with `--bct full` plus the fields shown, against a v1 of the same split and seed; "
        "epochs old/new as given. Figures are top-1 / mAP of v2 queries against v1's gallery, overall and by the "
        "query's class (old: v1 and v2 know it; new: v2 only; unseen: neither). v1/v1 is the bar to beat.",
        "",
        "| variant | split, seed, epochs | fields | overall | old | new | unseen | v2/v2 overall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    seen_v1: set[tuple[str, int]] = set()
    for r in recs:
        key = (r["split"], r["seed"])
        if key not in seen_v1:
            seen_v1.add(key)
            o = r["v1/v1"]
            out.append(
                f"| **v1/v1** | {r['split']}, {r['seed']}, {r['epochs'][0]} | - | {fmt(o, 'top1')} / {fmt(o, 'mAP')} | "
                + " | ".join(f"{fmt(o, p + '.top1')} / {fmt(o, p + '.mAP')}" for p in PARTS)
                + " | - |"
            )
        n, nn = r["v2/v1"], r["v2/v2"]
        fields = ", ".join(f"{k}={v}" for k, v in r["fields"].items() if k != "unlabeled") or "(none)"
        out.append(
            f"| {r['variant']} | {r['split']}, {r['seed']}, {r['epochs'][0]}/{r['epochs'][1]} | {fields} | "
            f"{fmt(n, 'top1')} / {fmt(n, 'mAP')} | "
            + " | ".join(f"{fmt(n, p + '.top1')} / {fmt(n, p + '.mAP')}" for p in PARTS)
            + f" | {fmt(nn, 'top1')} / {fmt(nn, 'mAP')} |"
        )
    out += [
        "",
        "The seed-0 rows of 0-3:0-5 were run on 2026-11-30 by a throwaway driver with the same TrainConfig "
        "fields, before this script existed (rerun any of them with `--variant NAME:FIELDS`). In "
        "`unl-old-cached-w4` the target was v1's embedding of the clean image, cached once; `old` now embeds the "
        "same augmented view the new model sees. A variant with neighbour targets at weight 16 and the warm "
        "start was stopped unfinished (two trainings at once on two cores). What the rows say: the unlabeled "
        "pull lifts unseen-class top-1 from 0.33 to 0.58-0.71, but no variant reaches v1/v1 (0.78) there or "
        "overall. The labelled terms move the new model's features for images near the new classes, and even "
        "at weight 64 from v1's own weights the pull does not hold them. The table below shows the ceiling: no "
        "query built from v1's embeddings (neighbour means, averaged augmentations) beats v1's own embedding on "
        "unseen top-1. Neighbour means gain at most +0.009 mAP there.",
    ]
    if ceiling_rows:
        out += [
            "",
            "### What queries made from v1 itself reach (no training)",
            "",
            "| query | overall top-1 / mAP | unseen top-1 / mAP |",
            "|---|---|---|",
        ]
        for name, r in ceiling_rows:
            out.append(
                f"| {name} | {r['top1']:.4f} / {r['mAP']:.4f} | {r['unseen_classes.top1']:.4f} / {r['unseen_classes.mAP']:.4f} |"
            )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", default="0-3:0-5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs-old", type=int, default=4)
    p.add_argument("--epochs-new", type=int, default=6)
    p.add_argument("--variant", action="append", default=[], help="NAME:KEY=VALUE,... (TrainConfig fields)")
    p.add_argument("--ceilings", action="store_true", help="also measure queries made from v1 alone")
    p.add_argument("--unlabeled", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--unlabeled-limit", type=int, default=20000)
    p.add_argument("--table", action="store_true", help="write the section to BENCHMARKS.md")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    test = load_split(None, "test")
    for spec in args.variant:
        name, fields = parse_variant(spec)
        rec = run_variant(args, name, fields, test)
        print(json.dumps(rec), flush=True)
    rows = ceilings(args, test) if args.ceilings else None
    text = table(rows)
    print(text)
    if args.table:
        write_section("Open-world recipe search", text)
        print("wrote the section to BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
