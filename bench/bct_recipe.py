"""BCT recipe search: variants of the BCT loss weights against one seed's v1 from bench/compat.py.

Each variant trains a v2 (classes 0-9, 12 epochs, seed s) against bench/out/compat/full/seed{s}/v1 and reports
v2/v1 against v1/v1 (overall, old and new classes), v2/v2 and the update gain on mAP. Results are appended to
bench/out/bct_recipe/results.jsonl (one line per variant and seed; a variant already there is not retrained)
and the table of every line is written to BENCHMARKS.md.

    .venv/bin/python -m bench.compat --seeds 2           # first: the seed's v1 (and the current recipe)
    .venv/bin/python -m bench.bct_recipe --seed 2 --variant 'pulls-old-cm4:pulls_on=old,class_mean_weight=4'
    .venv/bin/python -m bench.bct_recipe --table          # rewrite the BENCHMARKS.md table only
    .venv/bin/python -m bench.bct_recipe --ceilings --seed 0 1 2   # what v1's gallery allows (no training)

A variant is ``name:key=value,...`` with keys of TrainConfig's BCT fields (influence_weight, class_mean_weight,
old_embedding_weight, pulls_on, influence_scale, new_rows); the rest of the full recipe stays as it is in the code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from bench.common import REPO, compat_seed, machine_line, write_section
from trainer.train import TrainConfig, train

FIELDS = {
    "influence_weight": float,
    "class_mean_weight": float,
    "old_embedding_weight": float,
    "pulls_on": str,
    "influence_scale": float,
    "new_rows": str,
}
OUT = REPO / "bench" / "out" / "bct_recipe"


def parse_variant(spec: str) -> tuple[str, dict[str, object]]:
    name, _, rest = spec.partition(":")
    kw: dict[str, object] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in FIELDS:
            raise SystemExit(f"unknown variant key {key!r}: choose from {', '.join(FIELDS)}")
        kw[key] = FIELDS[key](value)
    return name, kw


def run(name: str, kw: dict[str, object], seed: int, epochs: int, threads: int | None) -> dict:
    v1 = compat_seed(seed) / "v1"
    if not (v1 / "card.json").exists():
        raise SystemExit(f"{v1} is missing: run `.venv/bin/python -m bench.compat --seeds {seed}` first")
    t0 = time.perf_counter()
    r = train(
        TrainConfig(
            out=str(OUT / f"{name}-s{seed}" / "v2"),
            epochs=epochs,
            old=str(v1),
            bct="full",
            seed=seed,
            threads=threads,
            **kw,
        )
    )  # type: ignore[arg-type]
    m, gain = r.card.metrics["matrix"], r.card.metrics["bct"]["v2/v1"]["update_gain"]["mAP"]
    oo, no, nn = m["v1/v1"], m["v2/v1"], m["v2/v2"]
    return {
        "name": name,
        "seed": seed,
        "epochs": epochs,
        "kw": kw,
        "weights": r.card.train_config["bct_weights"],
        "seconds": round(time.perf_counter() - t0),
        "threads": r.card.train_config["threads"],
        "v1/v1": {k: oo[k] for k in ("top1", "top5", "mAP")},
        "v2/v1": {k: no[k] for k in ("top1", "top5", "mAP")},
        "v2/v1 old mAP": no["old_classes"]["mAP"],
        "v2/v1 new mAP": no["new_classes"]["mAP"],
        "v2/v2 mAP": nn["mAP"],
        "gain mAP": gain,
    }


def ceilings(seed: int) -> dict:
    """mAP against seed s's v1 gallery for idealised queries: each query replaced by one vector per class.

    ``class mean``: v1's mean embedding of the class (train set), the full recipe's pull target for old classes;
    ``linear probe``: rows of a cosine-softmax classifier (scale 16) fitted on v1's train embeddings of all 10
    classes (``probe_new_rows``, which gives the full recipe's new-class rows), the most discriminative single
    direction per class. A v2 that classified every query right and put it exactly
    there would score this; v1/v1 and the compat benchmark's v2 (the default recipe) are given for comparison.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from trainer.artifact import embed_images, load_model
    from trainer.data import load_split, query_gallery_split
    from trainer.losses import probe_new_rows
    from trainer.metrics import retrieval_metrics

    root = compat_seed(seed)
    v1, v2 = load_model(root / "v1"), load_model(root / "v2")
    test, train_set = load_split(None, "test"), load_split(None, "train")
    q, g = query_gallery_split(len(test))
    ql, gl = test.labels[q], test.labels[g]
    e1 = np.asarray(embed_images(v1, test.images))
    tr = torch.from_numpy(np.asarray(embed_images(v1, train_set.images)))
    tl = torch.from_numpy(train_set.labels).long()
    raw_means = torch.stack([tr[tl == c].mean(0) for c in range(10)])
    means = F.normalize(raw_means, dim=1)
    # The trainer's probe (every row free), here fitted for all 10 classes.
    probe = probe_new_rows(tr, tl, raw_means, torch.ones(10, dtype=torch.bool), "probe").numpy()
    queries = {
        "v1 (v1/v1)": e1[q],
        "v2, the default recipe (v2/v1)": np.asarray(embed_images(v2, test.images))[q],
        "class mean": means.numpy()[ql],
        "linear probe": probe[ql],
    }
    # mAP is a mean over queries, so the overall and old/new figures are the per-class APs weighted by their
    # query counts: one ranking of the gallery per query instead of three.
    n = np.array([(ql == c).sum() for c in range(10)])
    old = np.isin(np.arange(10), v1.card.classes)
    out = {}
    for name, qe in queries.items():
        per = np.array([retrieval_metrics(qe[ql == c], ql[ql == c], e1[g], gl)["mAP"] for c in range(10)])
        out[name] = {
            "mAP": float(per @ n / n.sum()),
            "old": float(per[old] @ n[old] / n[old].sum()),
            "new": float(per[~old] @ n[~old] / n[~old].sum()),
            "per class": per.tolist(),
        }
    return {"seed": seed, "rows": out}


def render_ceilings(results: list[dict]) -> list[str]:
    out = [
        "",
        "### What v1's gallery allows (`--ceilings`)",
        "",
        "mAP of idealised queries against v1's gallery (no training; see `ceilings` in the script). Per class: "
        "AP of that class's queries, classes 0-4 old, 5-9 new (5 sandal, 6 shirt, 7 sneaker, 8 bag, 9 ankle boot).",
        "",
        "| seed | queries | mAP | old classes | new classes | per class 0-9 |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        for name, m in r["rows"].items():
            out.append(
                f"| {r['seed']} | {name} | {m['mAP']:.4f} | {m['old']:.3f} | {m['new']:.3f} | "
                + " ".join(f"{v:.2f}" for v in m["per class"])
                + " |"
            )
    return out


def render(rows: list[dict]) -> str:
    out = [
        "## BCT recipe search",
        "",
        "Command: `.venv/bin/python -m bench.bct_recipe --seed S --variant NAME:KEY=VALUE,...` (one line per run; "
        "`--table` rewrites this table from bench/out/bct_recipe/results.jsonl)",
        "",
        machine_line(),
        "",
        "Each row: a v2 trained 12 epochs (seed s, on the threads given; runs with 1 thread ran two at a time) against bench/compat.py's v1 of seed s, every other setting "
        "as in the full recipe at the time of the run (`weights` gives what it used). Criteria: v2/v1 top-1 > "
        "v1/v1, top-5 >= v1/v1 - 0.005, gain on mAP >= 0.50.",
        "",
        "| variant | seed | threads | weights (influence / class centre / old emb. / pulls on / scale / new-class rows) | v1/v1 top-1 | v2/v1 top-1 "
        "| v2/v1 top-5 | v1/v1 mAP | v2/v1 mAP | old / new classes | v2/v2 mAP | gain mAP |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        w, oo, no = r["weights"], r["v1/v1"], r["v2/v1"]
        top1 = f"{no['top1']:.4f}" if no["top1"] > oo["top1"] else f"**{no['top1']:.4f}**"
        top5 = f"{no['top5']:.4f}" if no["top5"] >= oo["top5"] - 0.005 else f"**{no['top5']:.4f}**"
        gain = f"{r['gain mAP']:.3f}" if r["gain mAP"] >= 0.5 else f"**{r['gain mAP']:.3f}**"
        out.append(
            f"| {r['name']} | {r['seed']} | {r.get('threads') or 'all'} | {w['influence']:g} / {w['to_class_mean']:g} / "
            f"{w['to_old_embedding']:g} / {w['pulls_on']} / {w['influence_scale'] or 'old head'} / "
            f"{w.get('new_rows', 'mean')} | "
            f"{oo['top1']:.4f} | {top1} | {top5} | {oo['mAP']:.4f} | {no['mAP']:.4f} | "
            f"{r['v2/v1 old mAP']:.3f} / {r['v2/v1 new mAP']:.3f} | {r['v2/v2 mAP']:.4f} | {gain} |"
        )
    out += ["", "Bold: the criterion fails."]
    ceil = OUT / "ceilings.json"
    if ceil.exists():
        out += render_ceilings(json.loads(ceil.read_text()))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, nargs="+", default=[2])
    p.add_argument("--variant", action="append", default=[], help="NAME:key=value,... (repeatable)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--table", action="store_true", help="only rewrite the BENCHMARKS.md table")
    p.add_argument(
        "--ceilings",
        action="store_true",
        help="measure what each seed's v1 gallery allows, then rewrite the table",
    )
    args = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    log = OUT / "results.jsonl"
    done = (
        {(r["name"], r["seed"]) for r in map(json.loads, log.read_text().splitlines())}
        if log.exists()
        else set()
    )
    if args.ceilings:
        (OUT / "ceilings.json").write_text(json.dumps([ceilings(s) for s in args.seed], indent=1))
    elif not args.table:
        for spec in args.variant:
            name, kw = parse_variant(spec)
            for seed in args.seed:
                if (name, seed) in done:
                    print(f"{name} seed {seed}: already in {log}", flush=True)
                    continue
                row = run(name, kw, seed, args.epochs, args.threads)
                with log.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    rows = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    write_section("BCT recipe search", render(rows))
    print(f"wrote {len(rows)} rows to BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
