"""Compatibility benchmark: BCT on Fashion-MNIST, closed- and open-world class splits, several seeds.

A split ``OLD:NEW`` trains v1 on classes OLD and BCT children on classes NEW against it. ``0-4:0-9`` is the
closed world (the new model knows every class the gallery holds); ``0-3:0-5`` and ``0-5:0-7`` are open: 40%
and 20% of the gallery are of classes neither model was trained on, as in every real gallery. Per split and
seed: v1; v2, the open-world recipe (the full BCT recipe with the unlabeled pull, started from v1's weights,
``RECIPE``); v2-full, the full recipe alone (labelled images only, from scratch: the default of
``graceful train --bct``); in the closed world also v2-indep (no BCT) for the criteria that need it.
Every metric is split three ways by the query's class: old (known to v1), new (known to v2 only) and unseen
(known to neither). Evaluated on the test split (queries = index % 5 == 0, gallery = the rest).

The unlabeled images are a seeded sample of the *training* split with its labels dropped, standing in for a
gallery export (``graceful export-sources``): images of every class, disjoint from the evaluated test split.

    .venv/bin/python -m bench.compat                 # 3 splits x 3 seeds (about 100 min on 2 cores)
    .venv/bin/python -m bench.compat --seeds 0 --quick   # a smoke run on a slice; prints only

Trained models are kept under bench/out/compat/ and reused when their settings match.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, command_line, machine_line, write_section
from trainer.artifact import load_model
from trainer.data import DEFAULT_DATA_DIR, load_split, parse_classes
from trainer.evaluate import evaluate_models
from trainer.losses import BCTWeights
from trainer.train import TrainConfig, reusable, train

SPLITS = ("0-3:0-5", "0-5:0-7", "0-4:0-9")
# The open-world recipe on top of `--bct full` (how it was chosen: the recipe table below, and
# BENCHMARKS.md "Compatibility (BCT)").
RECIPE: dict[str, Any] = {"init_from_old": True, "lr": 0.02}
PARTS = (("all", None), ("old", "old_classes"), ("new", "new_classes"), ("unseen", "unseen_classes"))
LABELS = {
    "v2": "v2 (open-world recipe: full + unlabeled + from v1)",
    "v2-full": "v2-full (`--bct full` alone)",
    "v2-indep": "v2-indep (no BCT)",
}


def split_dir(out: Path, split: str, seed: int, quick: bool) -> Path:
    # Not "full/": that folder holds the 6/12-epoch closed-world pair of earlier runs, which other
    # benchmarks reuse (bench/common.compat_seed).
    return out / ("quick" if quick else "") / split.replace(":", "_") / f"seed{seed}"


def closed(split: str, num_classes: int = 10) -> bool:
    return len(parse_classes(split.split(":")[1], num_classes)) == num_classes


def configs(root: Path, split: str, seed: int, args: argparse.Namespace) -> list[TrainConfig]:
    old_c, new_c = split.split(":")
    common = dict(seed=seed, limit=args.limit, threads=args.threads)
    v1 = str(root / "v1")
    cfgs = [
        TrainConfig(out=v1, classes=old_c, epochs=args.epochs_old, **common),
        TrainConfig(
            out=str(root / "v2"),
            classes=new_c,
            epochs=args.epochs_new,
            old=v1,
            bct="full",
            unlabeled=str(args.unlabeled),
            unlabeled_limit=args.unlabeled_limit,
            **RECIPE,
            **common,
        ),
    ]
    if seed in args.seeds[: args.baseline]:
        cfgs.append(
            TrainConfig(
                out=str(root / "v2-full"), classes=new_c, epochs=args.epochs_new, old=v1, bct="full", **common
            )
        )
    if closed(split):
        # Its own seed: a model sharing v1's initialisation stays partly aligned with v1's space.
        cfgs.append(
            TrainConfig(
                out=str(root / "v2-indep"),
                classes=new_c,
                epochs=args.epochs_new,
                **{**common, "seed": seed + 1000},
            )
        )
    return cfgs


def run_seed(root: Path, split: str, seed: int, args: argparse.Namespace, test) -> dict:
    cfgs = configs(root, split, seed, args)
    for cfg in cfgs:
        if reusable(cfg):
            print(f"{split} seed {seed}: reusing {cfg.out}", flush=True)
            continue
        t0 = time.perf_counter()
        train(cfg)
        print(f"{split} seed {seed}: trained {cfg.out} in {time.perf_counter() - t0:.0f} s", flush=True)
    folders = [Path(c.out) for c in cfgs]
    saved = root / "report.json"
    names = [f.name for f in folders]
    r = json.loads(saved.read_text()) if saved.exists() else None
    fresh = r is not None and saved.stat().st_mtime > max((f / "card.json").stat().st_mtime for f in folders)
    if fresh and r is not None and all(f"{q}/{g}" in r["matrix"] for q in names for g in names):
        print(f"{split} seed {seed}: reusing {saved}", flush=True)
        return r
    r = evaluate_models([load_model(f) for f in folders], test).to_json(include_flipped=False)
    saved.write_text(json.dumps(r, indent=1))
    return r


def metric(cell: dict, part: str | None, m: str) -> float | None:
    c = cell if part is None else cell.get(part)
    return None if c is None else c[m]


def criteria(split: str, r: dict) -> dict[str, bool]:
    """The issue's requirements for one split and seed."""
    m = r["matrix"]
    oo, no = m["v1/v1"], m["v2/v1"]
    out = {
        "v2/v1 > v1/v1 on top-1": no["top1"] > oo["top1"],
        "v2/v1 > v1/v1 on mAP": no["mAP"] > oo["mAP"],
    }
    if "unseen_classes" in oo:
        out["v2/v1 > v1/v1 on top-1, unseen classes"] = (
            no["unseen_classes"]["top1"] > oo["unseen_classes"]["top1"]
        )
        out["v2/v1 > v1/v1 on mAP, unseen classes"] = (
            no["unseen_classes"]["mAP"] > oo["unseen_classes"]["mAP"]
        )
    if closed(split):
        out["v2/v1 top-5 >= v1/v1 - 0.005"] = no["top5"] >= oo["top5"] - 0.005
        out["update gain on mAP >= 0.50"] = (r["bct"]["v2/v1"]["update_gain"]["mAP"] or 0) >= 0.50
        out["independent v2/v1 top-1 < half of v1/v1"] = m["v2-indep/v1"]["top1"] < 0.5 * oo["top1"]
        out["tax: v2/v2 >= 0.97 x v2-indep/v2-indep (mAP)"] = (
            m["v2/v2"]["mAP"] >= 0.97 * m["v2-indep/v2-indep"]["mAP"]
        )
    return out


def mean_sd(xs: list[float | None]) -> str:
    vals = [x for x in xs if x is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.4f}"
    return f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}"


def render(results: dict[str, list[tuple[int, dict]]], args: argparse.Namespace, seconds: float) -> str:
    w = BCTWeights.recipe("full")
    out = [
        "## Compatibility (BCT)",
        "",
        f"Command: {command_line()}",
        "",
        machine_line(),
        f"Fashion-MNIST. A split OLD:NEW: v1 trained on classes OLD ({args.epochs_old} epochs), every v2 on classes "
        f"NEW ({args.epochs_new} epochs) against v1; seeds {', '.join(map(str, args.seeds))} (v2-indep: seed s + "
        f"1000){'; train slice ' + str(args.limit) if args.limit else ''}. Test split: 2,000 queries (index % 5 == 0) "
        "against 8,000 gallery images, full ranking, cosine; every metric also split by the query's class: "
        "**old** (v1 and v2 know it), **new** (only v2), **unseen** (neither: 40% of the gallery in 0-3:0-5, "
        "20% in 0-5:0-7). Cells: mean ± sample standard deviation over seeds. "
        f"Wall time of this invocation {seconds / 60:.0f} min (models and evaluations are reused when present).",
        "",
        "- **v2-full**: `graceful train --bct full`, the default recipe: influence "
        f"{w.influence:g}, pull to the class centre {w.to_class_mean:g}, pull to the old embedding "
        f"{w.to_old_embedding:g} on labelled images, new classes' rows by a linear probe in v1's space; from "
        "scratch, lr 0.1.",
        "- **v2** (the open-world recipe): the same plus `--unlabeled DIR --unlabeled-limit "
        f"{args.unlabeled_limit} --init-from-old --lr {RECIPE['lr']}`: it starts from v1's weights (a small step "
        "from the old model) and each step also pulls the new embedding of a batch of augmented unlabeled "
        "images towards v1's embedding of the same view (weight 16). A seed's split trains in about 5-10 min "
        f"per model on 2 cores. Unlabeled images: {args.unlabeled_limit:,} of the training split, labels dropped (a "
        "stand-in for a gallery export; disjoint from the test split).",
        "",
    ]
    for split, runs in results.items():
        reports = [r for _, r in runs]
        names = [n for n in ("v2-full", "v2", "v2-indep") if all(f"{n}/v1" in r["matrix"] for r in reports)]
        some = [n for n in ("v2-full",) if n not in names and any(f"{n}/v1" in r["matrix"] for r in reports)]
        rows = [("v1/v1", "v1/v1")]
        for n in names + some:
            rows.append((f"{n}/v1", f"{n}/v1"))
        rows += [("v2/v2", "v2/v2")] + (
            [("v2-indep/v2-indep", "v2-indep/v2-indep")] if "v2-indep" in names else []
        )
        has_unseen = "unseen_classes" in reports[0]["matrix"]["v1/v1"]
        parts = [p for p in PARTS if p[0] != "unseen" or has_unseen]
        out += [
            f"### Split {split} ({'closed world' if closed(split) else 'open world'})",
            "",
            "| query / gallery | " + " | ".join(f"{p} top-1 | {p} mAP" for p, _ in parts) + " |",
            "|---|" + "---|---|" * len(parts),
        ]
        for key, label in rows:
            cells = [r["matrix"][key] for r in reports if key in r["matrix"]]
            seeds_note = (
                ""
                if len(cells) == len(reports)
                else f" (seed {', '.join(str(s) for s, r in runs if key in r['matrix'])})"
            )
            vals = [
                mean_sd([metric(c, part, m) for c in cells]) for _, part in parts for m in ("top1", "mAP")
            ]
            bold = key in ("v1/v1", "v2/v1")
            out.append(f"| {'**' + label + '**' if bold else label}{seeds_note} | " + " | ".join(vals) + " |")
        gains = "; ".join(
            f"{n} {mean_sd([r['bct'][f'{n}/v1'].get('update_gain', {}).get('mAP') for r in reports if f'{n}/v1' in r['bct']])}"
            for n in ["v2", *[m for m in names + some if m != "v2"]]
        )
        out += ["", f"Update gain on mAP, (M/v1 − v1/v1) / (M/M − v1/v1): {gains}.", ""]
    seeds = args.seeds
    out += [
        "### Criteria, per seed",
        "",
        "| split | criterion | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---|" + "---|" * len(seeds),
    ]
    failed = []
    for split, runs in results.items():
        crit = {s: criteria(split, r) for s, r in runs}
        for name in next(iter(crit.values())):
            cells = ["pass" if crit[s][name] else "**FAIL**" for s in seeds if s in crit]
            out.append(f"| {split} | {name} | " + " | ".join(cells) + " |")
            bad = [s for s in crit if not crit[s][name]]
            if bad:
                failed.append(f"{split} {name} (seed {', '.join(map(str, bad))})")
    out += [
        "",
        "**Every criterion is met on every seed of every split.**"
        if not failed
        else "**Not met on every seed**: " + "; ".join(failed) + ".",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--splits", nargs="+", default=list(SPLITS), help="OLD:NEW class ranges, e.g. 0-3:0-5")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs-old", type=int, default=4)
    p.add_argument("--epochs-new", type=int, default=6)
    p.add_argument(
        "--unlabeled", type=Path, default=DEFAULT_DATA_DIR, help="dataset folder (its train split)"
    )
    p.add_argument("--unlabeled-limit", type=int, default=20000)
    p.add_argument(
        "--baseline", type=int, default=3, help="train v2-full (the default recipe) for the first N seeds"
    )
    p.add_argument("--limit", type=int, default=None, help="train on a slice (smoke runs)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="1 epoch each on a 5k slice; prints only")
    p.add_argument("--write", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "compat")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs_old, args.epochs_new, args.limit = 1, 1, args.limit or 5000
        args.unlabeled_limit = min(args.unlabeled_limit, 2000)
    write = (not args.quick) if args.write is None else args.write
    t0 = time.perf_counter()
    test = load_split(None, "test")
    results: dict[str, list[tuple[int, dict]]] = {}
    # Seed by seed (every split of a seed before the next seed): an interrupted run leaves whole seeds.
    for seed in args.seeds:
        for split in args.splits:
            r = run_seed(split_dir(args.out, split, seed, args.quick), split, seed, args, test)
            results.setdefault(split, []).append((seed, r))
            print(
                f"{split} seed {seed}: "
                + ", ".join(f"{k}={'ok' if v else 'FAIL'}" for k, v in criteria(split, r).items()),
                flush=True,
            )
    text = render(results, args, time.perf_counter() - t0)
    print(text)
    if write:
        write_section("Compatibility (BCT)", text)
        print("wrote the section to BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
