"""A chain of five compatible generations on Fashion-MNIST: matrix, AC, gain on the founding gallery, tax.

Per seed s, each generation is trained with the open-world BCT recipe (bench/compat.py ``RECIPE``: the full
recipe, the unlabeled pull, started from its parent's weights) against its parent:

    v1  classes 0-3  4 epochs (no BCT)           } bench/compat.py's 0-3:0-5 split, reused
    v2  classes 0-5  6 epochs, BCT against v1    }
    v3  classes 0-7  4 epochs, BCT against v2
    v4  classes 0-9  4 epochs, BCT against v3
    v5  classes 0-9  8 epochs, BCT against v4 (the "more training" generation)

and beside each generation k >= 2 an independent model i<k> of the same classes and epochs (seed s + 1000, no
BCT), the model a team would have shipped without compatibility. Measured on the test split (queries =
index % 5 == 0, gallery = the rest, every class: a real gallery holds classes no generation has seen yet):

- the matrix M(q, g) of every (query generation, gallery generation) pair, top-1 and mAP;
- AC: the share of pairs i > j with M(v_i, v_j) > M(v_j, v_j) (BT², ICCV 2023);
- the gain on the founding gallery at generation k: (M(v_k, v1) - M(v1, v1)) / (M(i_k, i_k) - M(v1, v1));
- the compatibility tax of generation k: 1 - M(v_k, v_k) / M(i_k, i_k) (mAP);
- a mixed gallery: items embedded by v3, v4 and v5 in turn (index % 3), searched by v5, against the all-v5
  gallery.

    .venv/bin/python -m bench.generations                 # 3 seeds (about 25 min per seed on 2 cores)
    .venv/bin/python -m bench.generations --seeds 0 --quick   # a smoke run on a slice; prints only

Models are kept under bench/out/generations/ (v1, v2 under bench/out/compat/) and reused when settings match.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, command_line, machine_line, write_section
from bench.compat import RECIPE
from trainer.artifact import embed_images, load_model
from trainer.data import DEFAULT_DATA_DIR, load_split, query_gallery_split
from trainer.metrics import retrieval_metrics
from trainer.train import TrainConfig, reusable, train

SECTION = "Generations"
# (classes, epochs) of generations 1..5.
CHAIN = (("0-3", 4), ("0-5", 6), ("0-7", 4), ("0-9", 4), ("0-9", 8))
AIM_GAIN = 0.5
AIM_TAX = 0.02


def chain_configs(seed: int, args: argparse.Namespace) -> list[tuple[str, TrainConfig]]:
    """(name, config) of every model of one seed, parents before children."""
    common: dict[str, Any] = dict(seed=seed, limit=args.limit, threads=args.threads)
    chain = [(c, 1 if args.quick else e) for c, e in CHAIN]
    compat = args.compat / ("quick" if args.quick else "") / "0-3_0-5" / f"seed{seed}"
    own = args.out / ("quick" if args.quick else "full") / f"seed{seed}"
    indep = own  # the independent models do not depend on the BCT target: shared by both variants
    if args.against == "founding":  # every generation's BCT target is v1 (a star, not a chain)
        own = own.parent / f"{own.name}-founding"
    paths = [compat / "v1", compat / "v2"] + [own / f"v{k}" for k in range(3, len(chain) + 1)]
    unl = dict(unlabeled=str(args.unlabeled), unlabeled_limit=args.unlabeled_limit)
    out: list[tuple[str, TrainConfig]] = [
        ("v1", TrainConfig(out=str(paths[0]), classes=chain[0][0], epochs=chain[0][1], **common))
    ]
    for k in range(1, len(chain)):
        classes, epochs = chain[k]
        out.append(
            (
                f"v{k + 1}",
                TrainConfig(
                    out=str(paths[k]),
                    classes=classes,
                    epochs=epochs,
                    old=str(paths[0] if args.against == "founding" else paths[k - 1]),
                    bct="full",
                    **unl,
                    **RECIPE,
                    **common,
                ),
            )
        )
        out.append(
            (
                f"i{k + 1}",
                TrainConfig(
                    out=str(indep / f"i{k + 1}"),
                    classes=classes,
                    epochs=epochs,
                    **{**common, "seed": seed + 1000},
                ),
            )
        )
    return out


def _cell(q: np.ndarray, g: np.ndarray, labels: np.ndarray, qi: np.ndarray, gi: np.ndarray) -> dict:
    m = retrieval_metrics(q[qi], labels[qi], g[gi], labels[gi])
    return {"top1": m["top1"], "mAP": m["mAP"]}


def evaluate_seed(models: dict[str, Any], test) -> dict[str, Any]:
    """The chain's matrix, the independent models' own spaces, the v1 gallery under every model, and the
    mixed gallery, from each model's embeddings of the test split."""
    labels = np.asarray(test.labels)
    qi, gi = query_gallery_split(len(labels))
    emb = {name: embed_images(m, test.images) for name, m in models.items()}
    gens = sorted((n for n in models if n.startswith("v")), key=lambda n: int(n[1:]))
    matrix = {f"{a}/{b}": _cell(emb[a], emb[b], labels, qi, gi) for a in gens for b in gens}
    for n in models:
        if n.startswith("i"):
            matrix[f"{n}/{n}"] = _cell(emb[n], emb[n], labels, qi, gi)
            matrix[f"{n}/v1"] = _cell(emb[n], emb["v1"], labels, qi, gi)
    mixed_from = gens[-3:]
    last = gens[-1]
    mixed = np.empty_like(emb[last])
    for r, name in enumerate(mixed_from):
        rows = np.arange(len(labels)) % len(mixed_from) == r
        mixed[rows] = emb[name][rows]
    matrix[f"{last}/mixed"] = _cell(emb[last], mixed, labels, qi, gi)
    return {"gens": gens, "mixed_from": mixed_from, "matrix": matrix}


def criteria(r: dict[str, Any]) -> dict[str, Any]:
    """AC, gain on the founding gallery and tax per generation, from one seed's matrix."""
    m, gens = r["matrix"], r["gens"]
    out: dict[str, Any] = {"ac": {}, "gain": {}, "tax": {}, "tax_points": {}}
    for metric in ("top1", "mAP"):
        pairs = [(i, j) for i in range(len(gens)) for j in range(i)]
        ok = [m[f"{gens[i]}/{gens[j]}"][metric] > m[f"{gens[j]}/{gens[j]}"][metric] for i, j in pairs]
        out["ac"][metric] = sum(ok) / len(ok)
        out["ac_fails_" + metric] = [
            f"{gens[i]}/{gens[j]}" for (i, j), o in zip(pairs, ok, strict=True) if not o
        ]
    base = m["v1/v1"]["mAP"]
    for g in gens[1:]:
        ind = "i" + g[1:]
        if f"{ind}/{ind}" not in m:
            continue
        own = m[f"{ind}/{ind}"]["mAP"]
        out["gain"][g] = (m[f"{g}/v1"]["mAP"] - base) / (own - base) if own != base else None
        out["tax"][g] = 1.0 - m[f"{g}/{g}"]["mAP"] / own
        out["tax_points"][g] = own - m[f"{g}/{g}"]["mAP"]
    return out


def run_seed(seed: int, args: argparse.Namespace, test) -> dict[str, Any]:
    cfgs = chain_configs(seed, args)
    for name, cfg in cfgs:
        if reusable(cfg):
            print(f"seed {seed}: reusing {name} ({cfg.out})", flush=True)
            continue
        t0 = time.perf_counter()
        train(cfg)
        print(f"seed {seed}: trained {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    models = {name: load_model(cfg.out) for name, cfg in cfgs}
    r = evaluate_seed(models, test)
    r["seed"] = seed
    r["train_seconds"] = {n: m.card.train_config.get("seconds") for n, m in models.items()}
    r["criteria"] = criteria(r)
    own = Path(cfgs[-1][1].out).parent
    own.mkdir(parents=True, exist_ok=True)
    (own / "report.json").write_text(json.dumps(r, indent=1))
    return r


def mean_sd(xs: list[float | None], pct: bool = False) -> str:
    vals = [(100.0 if pct else 1.0) * x for x in xs if x is not None]
    if not vals:
        return "-"
    f = "{:.2f}" if pct else "{:.4f}"
    tail = "%" if pct else ""
    if len(vals) == 1:
        return f.format(vals[0]) + tail
    return f.format(statistics.mean(vals)) + " ± " + f.format(statistics.stdev(vals)) + tail


def section_title(args: argparse.Namespace) -> str:
    return SECTION if args.against == "parent" else f"{SECTION}, every generation BCT'd against v1"


def render(results: list[dict[str, Any]], args: argparse.Namespace, seconds: float) -> str:
    seeds = [r["seed"] for r in results]
    gens = results[0]["gens"]
    chain = ", ".join(
        f"{g}: classes {c}, {e} epochs"
        + ("" if i == 0 else f", BCT against {'v1' if args.against == 'founding' else gens[i - 1]}")
        for i, (g, (c, e)) in enumerate(zip(gens, CHAIN, strict=True))
    )
    out = [
        f"## {section_title(args)}",
        "",
        f"Command: {command_line()}",
        "",
        machine_line(),
        f"Fashion-MNIST, seeds {', '.join(map(str, seeds))}. The chain ({chain}); every child trained with the "
        'open-world recipe of "Compatibility (BCT)" (`--bct full --unlabeled DIR --unlabeled-limit '
        f"{args.unlabeled_limit} --init-from-old --lr {RECIPE['lr']}`) against "
        + ("v1 (and started from v1's weights)" if args.against == "founding" else "its parent")
        + "; v1 and v2 are that "
        "section's 0-3:0-5 models. Beside each generation k ≥ 2, i<k>: an independent model of the same "
        "classes and epochs (seed s + 1000, no BCT). Test split: 2,000 queries (index % 5 == 0) against 8,000 "
        "gallery images of every class, full ranking, cosine. Mean ± sample standard deviation over seeds. "
        f"Wall time of this invocation {seconds / 60:.0f} min (models are reused when present).",
        "",
    ]
    for metric, label in (("top1", "top-1"), ("mAP", "mAP")):
        out += [
            f"### Matrix, {label} (row: query generation, column: gallery generation)",
            "",
            "| query \\ gallery | " + " | ".join(gens) + " |",
            "|---|" + "---|" * len(gens),
        ]
        for q in gens:
            cells = []
            for g in gens:
                v = mean_sd([r["matrix"][f"{q}/{g}"][metric] for r in results])
                cells.append(f"**{v}**" if q == g else v)
            out.append(f"| {q} | " + " | ".join(cells) + " |")
        out.append("")
    crit = [r["criteria"] for r in results]
    out += [
        "### Criteria per generation",
        "",
        "| generation | v_k/v1 mAP | i_k/i_k mAP | gain on the founding gallery | v_k/v_k mAP | tax (mAP, relative) |",
        "|---|---|---|---|---|---|",
    ]
    for g in gens[1:]:
        ind = "i" + g[1:]
        out.append(
            f"| {g} | {mean_sd([r['matrix'][f'{g}/v1']['mAP'] for r in results])} | "
            f"{mean_sd([r['matrix'][f'{ind}/{ind}']['mAP'] for r in results])} | "
            f"{mean_sd([c['gain'].get(g) for c in crit])} | "
            f"{mean_sd([r['matrix'][f'{g}/{g}']['mAP'] for r in results])} | "
            f"{mean_sd([c['tax'].get(g) for c in crit], pct=True)} |"
        )
    last = gens[-1]
    mixed_from = results[0]["mixed_from"]
    out += [
        "",
        f"v1/v1 mAP {mean_sd([r['matrix']['v1/v1']['mAP'] for r in results])}. "
        f"The independent models on the founding gallery (i_k/v1) are what no compatibility gives: mAP "
        + ", ".join(
            f"i{g[1:]} {mean_sd([r['matrix'][f'i{g[1:]}/v1']['mAP'] for r in results])}" for g in gens[1:]
        )
        + ".",
        "",
        f"**Mixed gallery** (items embedded by {', '.join(mixed_from)} in turn, one space), searched by {last}: "
        f"top-1 {mean_sd([r['matrix'][f'{last}/mixed']['top1'] for r in results])}, mAP "
        f"{mean_sd([r['matrix'][f'{last}/mixed']['mAP'] for r in results])}; the all-{last} gallery: top-1 "
        f"{mean_sd([r['matrix'][f'{last}/{last}']['top1'] for r in results])}, mAP "
        f"{mean_sd([r['matrix'][f'{last}/{last}']['mAP'] for r in results])}; the all-{mixed_from[0]} gallery "
        f"({last}/{mixed_from[0]}): mAP {mean_sd([r['matrix'][f'{last}/{mixed_from[0]}']['mAP'] for r in results])}.",
        "",
        "### Aims, per seed",
        "",
        "| aim | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|" + "---|" * len(seeds),
    ]
    aims: dict[str, list[bool]] = {}
    for metric, label in (("top1", "top-1"), ("mAP", "mAP")):
        row = [c["ac"][metric] for c in crit]
        aims[f"AC = 1.0 ({label})"] = [v >= 1.0 for v in row]
        out.append(
            f"| AC = 1.0 ({label}) | "
            + " | ".join(
                f"{v:.2f}" + ("" if v >= 1.0 else f" (fails: {', '.join(c['ac_fails_' + metric])})")
                for v, c in zip(row, crit, strict=True)
            )
            + " |"
        )
    for g in gens[1:]:
        gains = [c["gain"].get(g) for c in crit]
        aims[f"gain {g} ≥ {AIM_GAIN}"] = [x is not None and x >= AIM_GAIN for x in gains]
        out.append(
            f"| gain on the founding gallery, {g} ≥ {AIM_GAIN} | "
            + " | ".join("-" if x is None else f"{x:.2f}" for x in gains)
            + " |"
        )
    for g in gens[1:]:
        taxes = [c["tax"].get(g) for c in crit]
        aims[f"tax {g} ≤ 2%"] = [x is not None and x <= AIM_TAX for x in taxes]
        out.append(
            f"| tax, {g} ≤ {100 * AIM_TAX:.0f}% mAP | "
            + " | ".join("-" if x is None else f"{100 * x:.2f}%" for x in taxes)
            + " |"
        )
    missed = [k for k, v in aims.items() if not all(v)]
    out += [
        "",
        "**Every aim is met on every seed.**"
        if not missed
        else "**Missed** (on at least one seed): " + "; ".join(missed) + ".",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--unlabeled", type=Path, default=DEFAULT_DATA_DIR, help="dataset folder (its train split)"
    )
    p.add_argument("--unlabeled-limit", type=int, default=20000)
    p.add_argument("--limit", type=int, default=None, help="train on a slice (smoke runs)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="1 epoch each on a 5k slice; prints only")
    p.add_argument("--write", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "generations")
    p.add_argument("--compat", type=Path, default=REPO / "bench" / "out" / "compat", help="v1, v2 from here")
    p.add_argument(
        "--against",
        choices=["parent", "founding"],
        default="parent",
        help="each generation's BCT target (and warm start): its parent (a chain), or v1 (a star)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.limit = args.limit or 5000
        args.unlabeled_limit = min(args.unlabeled_limit, 2000)
    write = (not args.quick and not args.limit) if args.write is None else args.write
    t0 = time.perf_counter()
    test = load_split(None, "test")
    results = []
    for seed in args.seeds:
        r = run_seed(seed, args, test)
        c = r["criteria"]
        print(
            f"seed {seed}: AC top-1 {c['ac']['top1']:.2f} mAP {c['ac']['mAP']:.2f}; gain "
            + ", ".join(f"{g} {v:.2f}" for g, v in c["gain"].items() if v is not None)
            + "; tax "
            + ", ".join(f"{g} {100 * v:.2f}%" for g, v in c["tax"].items()),
            flush=True,
        )
        results.append(r)
    text = render(results, args, time.perf_counter() - t0)
    print(text)
    if write:
        write_section(section_title(args), text)
        print("wrote the section to BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
