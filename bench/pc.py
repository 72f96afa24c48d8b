"""Positive-congruent training benchmark, converged: negative flips of an update, in classification and in
search, with focal distillation, weight interpolation (BCWI), linearised fine-tuning (LQF) and BCT + PC.

Per seed s, on Fashion-MNIST (all 10 classes), every network the ``small`` preset with leaky ReLU (slope 0.1:
the activation LQF linearises, so one v1 serves every row):

- **v1**, the model in service: seed s, a seeded half of the training set (30,000 images), ``--epochs``.
- **v2 from scratch** (seed s + 100, all 60,000 images, ``--epochs``), against v1: no treatment; focal
  distillation with the paper's settings, ``fd-lm`` (alpha 1, beta 5) and ``fd-kl`` (alpha 1, beta 5, T 100);
  ``fd-lm`` with a 20x term weight (1 instead of 0.05), with v1 run live on every augmented view and, for
  comparison, with v1's logits cached once on the clean images (``--cache-old-logits``).
- **Cross-architecture**: v2 ``small`` at width 12 (v1's is 8), no treatment and the 20x ``fd-lm``.
- **Fine-tuning v1** on all 60,000 images (``--ft-epochs``, from v1's weights): plain (cross-entropy,
  lr 0.02), with the 20x ``fd-lm``, and LQF (``--lqf``: linearised, least squares, K-FAC, lr 0.5 of the
  optimal step); BCWI mixes of v1 with each fine-tuned network, ``(1 - alpha) * ft + alpha * v1``.
- **Search**: the BCT child (``--bct full``) and the BCT child with a PC term (``--bct full --pc fd-lm``, 20x).
- **Curve** (seed 0): v1's and the untreated v2's test error at 8, 16, 24 and 32 epochs, one cosine schedule
  per length: where the error flattens, which ``--epochs`` should be.

Every model is compared with v1 on the 10,000 test images: classification error, NFR (v1 right, new wrong),
and retrieval (queries: index % 5 == 0, gallery: the rest): top-1, mAP, and retrieval flips (a query whose
top-1 had its class under v1/v1 and not under the new setting: NFR; the reverse: PFR), for the new model's
own gallery (new/new) and for v1's (new/old). Writes mean ± sample standard deviation over seeds to
BENCHMARKS.md ("## Positive-congruent training").

    .venv/bin/python -m bench.pc --jobs 2 --threads 1          # 3 seeds; two trainings at a time
    .venv/bin/python -m bench.pc --seeds 0 --quick             # a smoke run on a slice; prints only

Trained models are kept under bench/out/pc/ and reused when their settings match.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import REPO, command_line, machine_line, write_section
from trainer.artifact import LoadedModel, embed_images, load_model, predict_labels
from trainer.data import Dataset, load_split, query_gallery_split
from trainer.interpolate import InterpolateConfig, interpolate
from trainer.lqf import load_linearised
from trainer.metrics import negative_flips, retrieval_flips, retrieval_metrics, top1_hits
from trainer.train import TrainConfig, reusable, train

SECTION = "Positive-congruent training"
SLOPE = 0.1  # leaky ReLU everywhere: LQF's activation
HALF = 30_000  # v1's training images
WIDE = 12  # the cross-architecture v2's width (the small preset's is 8)
STRONG = 1.0  # the 20x fd-lm term weight (the preset's is 0.05)
ALPHAS = (0.3, 0.5)  # BCWI: the old model's share
CURVE = {"v1": (8, 16, 24, 32, 48), "v2": (8, 16, 24, 32)}  # schedule lengths, epochs
CROSS_JOBS = ("wide-none", "wide-fd-lm-x20")
SEED_LIGHT = ("lqf", "bct", "bct-pc")  # what --flips-only-seeds leaves out

# Rows of the classification table, in order: name -> label.
SCRATCH = {
    "none": "no treatment",
    "fd-lm": "fd-lm, paper (α 1, β 5; weight 0.05)",
    "fd-kl": "fd-kl, paper (α 1, β 5, T 100)",
    "fd-lm-x20": "fd-lm, 20x weight (1)",
    "fd-lm-x20-cached": "fd-lm, 20x, teacher cached on clean images",
}
FINETUNE = {
    "ft": "fine-tuned v1 (cross-entropy)",
    "ft-fd": "fine-tuned v1 + fd-lm 20x",
    **{f"bcwi-ft-a{a}": f"BCWI(fine-tuned, α {a})" for a in ALPHAS},
    **{f"bcwi-ftfd-a{a}": f"BCWI(fine-tuned + fd-lm 20x, α {a})" for a in ALPHAS},
    "lqf": "LQF, saved network f(x; w)",
    "lqf-linear": "LQF, linear model f_lin(x; w)",
}
CROSS = {"wide-none": "no treatment", "wide-fd-lm-x20": "fd-lm, 20x weight (1)"}
SEARCH = {"bct": "BCT child (--bct full)", "bct-pc": "BCT + PC child (--bct full --pc fd-lm, 20x)"}


@dataclass
class Job:
    """One training of one seed; ``needs``: the names of the seed's jobs whose models it reads."""

    seed: int
    name: str
    cfg: TrainConfig
    needs: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"seed{self.seed}/{self.name}"


@dataclass
class Plan:
    """The run's settings; ``jobs``: trainings at a time."""

    jobs: int
    epochs: int
    epochs_old: int
    ft_epochs: int
    cross_seeds: tuple[int, ...]
    limit: int | None
    threads: int | None
    root: Path
    flips_only: tuple[int, ...] = ()  # seeds without the LQF and BCT rows

    def wants(self, job: Job) -> bool:
        if job.name in CROSS_JOBS and job.seed not in self.cross_seeds:
            return False
        return not (job.name in SEED_LIGHT and job.seed in self.flips_only)


def _base(plan: Plan) -> TrainConfig:
    """Every model's common settings: the small preset, leaky ReLU."""
    return TrainConfig(out="", arch="small", negative_slope=SLOPE, threads=plan.threads)


def _half(plan: Plan) -> int:
    return min(HALF, plan.limit) // 2 if plan.limit else HALF


def seed_jobs(plan: Plan, seed: int) -> list[Job]:
    root = plan.root / f"seed{seed}"
    base = _base(plan)
    v1 = replace(
        base,
        out=str(root / f"curve-v1-e{plan.epochs_old}"),
        epochs=plan.epochs_old,
        seed=seed,
        limit=_half(plan),
    )
    new = replace(base, seed=seed + 100, limit=plan.limit, epochs=plan.epochs)  # v2 from scratch
    against = replace(new, old=v1.out)
    # The teacher runs live on each augmented view: a cache of its answers on the clean images is a different
    # target (on Fashion-MNIST v1 changes its answer on 7.5% of the views); the cached row shows the cost.
    paper = replace(against, pc_alpha=1.0, pc_beta=5.0)
    strong = replace(paper, pc="fd-lm", pc_weight=STRONG)
    ft = replace(against, init_from_old=True, epochs=plan.ft_epochs, lr=0.02)
    jobs = [
        Job(seed, "v1", v1),
        Job(seed, "none", replace(new, out=str(root / f"curve-v2-e{plan.epochs}"))),
        Job(seed, "fd-lm", replace(paper, out=str(root / "v2-fd-lm"), pc="fd-lm"), ("v1",)),
        Job(
            seed,
            "fd-kl",
            replace(paper, out=str(root / "v2-fd-kl"), pc="fd-kl", pc_temperature=100.0),
            ("v1",),
        ),
        Job(seed, "fd-lm-x20", replace(strong, out=str(root / "v2-fd-lm-x20")), ("v1",)),
        Job(
            seed,
            "fd-lm-x20-cached",
            replace(strong, out=str(root / "cached" / "v2-fd-lm-x20"), cache_old_logits=True),
            ("v1",),
        ),
        Job(seed, "ft", replace(ft, out=str(root / "v2-ft")), ("v1",)),
        Job(
            seed,
            "ft-fd",
            replace(strong, out=str(root / "v2-ft-fd"), init_from_old=True, epochs=plan.ft_epochs, lr=0.02),
            ("v1",),
        ),
        Job(
            seed,
            "lqf",
            replace(against, out=str(root / "v2-lqf"), lqf=True, epochs=plan.ft_epochs, lr=0.5),
            ("v1",),
        ),
        Job(seed, "bct", replace(against, out=str(root / "v2-bct"), bct="full"), ("v1",)),
        Job(seed, "bct-pc", replace(strong, out=str(root / "v2-bct-pc"), bct="full"), ("v1",)),
        Job(seed, "wide-none", replace(new, out=str(root / "v2-wide-none"), width=WIDE)),
        Job(
            seed, "wide-fd-lm-x20", replace(strong, out=str(root / "v2-wide-fd-lm-x20"), width=WIDE), ("v1",)
        ),
    ]
    return jobs


def curve_jobs(plan: Plan, seed: int) -> list[Job]:
    """The length sweep: v1 and the untreated v2 at each length of CURVE (the comparison's own lengths are its
    v1 and v2)."""
    root = plan.root / f"seed{seed}"
    base = _base(plan)
    out = []
    for who, lengths in CURVE.items():
        own = plan.epochs_old if who == "v1" else plan.epochs
        for e in lengths:
            if e == own:
                continue
            cfg = (
                replace(base, epochs=e, seed=seed, limit=_half(plan))
                if who == "v1"
                else replace(base, epochs=e, seed=seed + 100, limit=plan.limit)
            )
            out.append(Job(seed, f"curve-{who}-e{e}", replace(cfg, out=str(root / f"curve-{who}-e{e}"))))
    return out


def _train(cfg: TrainConfig) -> float:
    t0 = time.perf_counter()
    train(cfg)
    return time.perf_counter() - t0


def run_jobs(jobs: list[Job], workers: int) -> None:
    """Train every job not already on disk, ``workers`` at a time (one process each), a job once the jobs it
    needs are done; in list order otherwise, so the earlier seeds finish first."""
    done = {j.key for j in jobs if reusable(j.cfg)}
    for j in jobs:
        if j.key in done:
            print(f"{j.key}: reusing {j.cfg.out}", flush=True)
    pending = [j for j in jobs if j.key not in done]
    running: dict[Future[float], Job] = {}
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max(1, workers), mp_context=mp.get_context("spawn")) as pool:
        while pending or running:
            for j in [j for j in pending if all(f"seed{j.seed}/{n}" in done for n in j.needs)]:
                if len(running) >= workers:
                    break
                pending.remove(j)
                running[pool.submit(_train, j.cfg)] = j
                print(f"{j.key}: training ({len(pending)} waiting)", flush=True)
            if not running:
                raise RuntimeError(f"jobs whose inputs never come: {[j.key for j in pending]}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                j = running.pop(f)
                secs = f.result()  # a failed training stops the benchmark here, with its error
                done.add(j.key)
                print(
                    f"{j.key}: trained in {secs:.0f} s ({(time.perf_counter() - t0) / 60:.0f} min in)",
                    flush=True,
                )


# --- measuring ------------------------------------------------------------------------------------------------


@dataclass
class Outputs:
    """One model's answers on the test split: (N, D) unit embeddings and (N,) predicted labels."""

    emb: np.ndarray
    pred: np.ndarray


def outputs(model: LoadedModel, test: Dataset) -> Outputs:
    emb = embed_images(model, test.images)
    return Outputs(emb, predict_labels(model, emb))


def linear_outputs(folder: str, old_folder: str, test: Dataset) -> Outputs:
    """The LQF folder's linear model f_lin(x; w) (trainer.lqf), on the test split."""
    lin = load_linearised(folder, old_folder)
    prep = load_model(old_folder).preprocess
    embs, rows = [], []
    with torch.no_grad():
        for i in range(0, len(test.images), 1024):
            e, logits = lin.outputs(prep(test.images[i : i + 1024]))
            embs.append(F.normalize(e, dim=1).numpy())
            rows.append(logits.argmax(1).numpy())
    return Outputs(np.concatenate(embs), np.asarray(lin.classes)[np.concatenate(rows)])


def compare(old: Outputs, new: Outputs, labels: np.ndarray, same_dim: bool) -> dict:
    """The new model against v1: classification flips, and retrieval on its own gallery (new/new) and, when
    the embeddings have v1's dimension, on v1's (new/old), each with flips against v1/v1."""
    q, g = query_gallery_split(len(labels), 5)
    ql, gl = labels[q], labels[g]
    cls = negative_flips(old.pred, new.pred, labels)
    out: dict[str, Any] = {k: cls[k] for k in ("err_old", "err_new", "nfr", "rel_nfr", "n_flips", "n")}
    old_hits = top1_hits(old.emb[q], ql, old.emb[g], gl)
    out["old_old"] = retrieval_metrics(old.emb[q], ql, old.emb[g], gl)
    galleries = {"new_new": new.emb[g]} | ({"new_old": old.emb[g]} if same_dim else {})
    for key, gallery in galleries.items():
        m = retrieval_metrics(new.emb[q], ql, gallery, gl)
        fl = retrieval_flips(old_hits, top1_hits(new.emb[q], ql, gallery, gl))
        out[key] = {**m, **{k: fl[k] for k in ("nfr", "pfr", "rel_nfr", "n_negative", "n_positive")}}
    return out


def measure_seed(plan: Plan, seed: int, test: Dataset, alphas: tuple[float, ...]) -> dict:
    root = plan.root / f"seed{seed}"
    cfgs = {j.name: j.cfg for j in seed_jobs(plan, seed) if plan.wants(j)}
    v1_dir = cfgs["v1"].out
    for src, tag in (("ft", "ft"), ("ft-fd", "ftfd")):
        for a in alphas:
            # No training: seconds. Always rewritten, so a retrained source is never mixed stale.
            interpolate(
                InterpolateConfig(
                    old=v1_dir, new=cfgs[src].out, alpha=a, out=str(root / f"bcwi-{tag}-a{a}"), evaluate=False
                )
            )
    folders = {n: c.out for n, c in cfgs.items()} | {
        f"bcwi-{tag}-a{a}": str(root / f"bcwi-{tag}-a{a}") for tag in ("ft", "ftfd") for a in alphas
    }
    models = {n: load_model(f) for n, f in folders.items()}
    outs = {n: outputs(m, test) for n, m in models.items()}
    if "lqf" in folders:
        outs["lqf-linear"] = linear_outputs(folders["lqf"], v1_dir, test)
    labels = np.asarray(test.labels)
    dim = models["v1"].card.embedding_dim
    result: dict = {"seed": seed, "train_seconds": {}}
    for n, m in models.items():
        result["train_seconds"][n] = m.card.train_config.get("seconds")
    for n, o in outs.items():
        if n == "v1":
            continue
        result[n] = compare(outs["v1"], o, labels, o.emb.shape[1] == dim)
    for n in list(outs):
        if n in ("v1",):
            continue
        base = "wide-none" if n.startswith("wide-") else "none"
        r, b = result[n], result[base]
        r["nfr_cut"] = 1.0 - r["nfr"] / b["nfr"] if b["nfr"] else 0.0
        r["err_delta"] = r["err_new"] - b["err_new"]
    if "bct" in result:
        r, b = result["bct-pc"], result["bct"]
        r["retrieval_nfr_cut_vs_bct"] = (
            1.0 - r["new_old"]["nfr"] / b["new_old"]["nfr"] if b["new_old"]["nfr"] else 0.0
        )
    return result


def bn_scale(plan: Plan, seed: int) -> dict[str, float]:
    """Mean ratio of BatchNorm running variances, fine-tuned network over v1: how far the scale of its
    (BatchNorm-invariant) weights moved, which a linear weight mix (BCWI) is not invariant to."""
    cfgs = {j.name: j.cfg for j in seed_jobs(plan, seed)}
    v1 = load_model(cfgs["v1"].out).model.state_dict()
    keys = [k for k in v1 if k.endswith("running_var")]
    out = {}
    for name in ("ft", "ft-fd"):
        st = load_model(cfgs[name].out).model.state_dict()
        out[name] = float(np.mean([float((st[k] / v1[k].clamp_min(1e-12)).mean()) for k in keys]))
    return out


def curve_errors(plan: Plan, seed: int, test: Dataset) -> dict:
    root = plan.root / f"seed{seed}"
    out: dict = {}
    labels = np.asarray(test.labels)
    for e in sorted({*CURVE["v1"], *CURVE["v2"]}):
        for who in ("v1", "v2"):
            folder = root / f"curve-{who}-e{e}"
            if not (folder / "card.json").is_file():
                continue
            m = load_model(folder)
            o = outputs(m, test)
            out[f"{who}-e{e}"] = {
                "error": float((o.pred != labels).mean()),
                "seconds": m.card.train_config.get("seconds"),
            }
    return out


# --- the report ------------------------------------------------------------------------------------------------


def ms(xs: list[float], pct: bool = True, digits: int = 2) -> str:
    k, unit = (100.0, "%") if pct else (1.0, "")
    f = f"{{:.{digits}f}}"
    if not xs:
        return "—"
    if len(xs) == 1:
        return f.format(k * xs[0]) + unit
    return f"{f.format(k * statistics.mean(xs))} ± {f.format(k * statistics.stdev(xs))}{unit}"


def values(results: list[dict], name: str, *path: str) -> list[float]:
    """Row ``name``'s value at ``path``, one per seed that has the row."""
    vals = []
    for r in (r for r in results if name in r):
        v = r[name]
        for p in path:
            v = v[p]
        vals.append(v)
    return vals


def mean(results: list[dict], name: str, *path: str) -> float:
    """The mean over the seeds that have row ``name``."""
    return statistics.mean(values(results, name, *path))


def col(results: list[dict], name: str, *path: str, pct: bool = True, digits: int = 2) -> str:
    """Mean ± sd over the seeds that have row ``name``."""
    return ms(values(results, name, *path), pct, digits)


def curve_reading(curve: dict, plan: Plan) -> str:
    """How far each model's error still moved between the sweep's last two lengths."""
    parts, deltas = [], []
    for who in ("v1", "v2"):
        have = [e for e in CURVE[who] if f"{who}-e{e}" in curve]
        if len(have) >= 2:
            a, b = have[-2], have[-1]
            d = 100 * (curve[f"{who}-e{b}"]["error"] - curve[f"{who}-e{a}"]["error"])
            deltas.append(d)
            parts.append(f"{who}'s error moved {d:+.2f} points from {a} to {b} epochs")
    where = f"The comparison trains v1 for {plan.epochs_old} epochs and v2 for {plan.epochs}"
    if not parts:
        return where + "."
    flat = all(abs(d) <= 0.3 for d in deltas)
    return (
        "; ".join(parts) + f": {'flat within 0.3 points' if flat else 'not yet flat to 0.3 points'}. {where}."
    )


def tagged(results: list[dict], name: str, label: str) -> str:
    """A row's label, naming its seeds when only some seeds have it."""
    have = [str(r["seed"]) for r in results if name in r]
    return label if len(have) == len(results) else f"{label} (seed {', '.join(have)})"


def render(results: list[dict], curve: dict, plan: Plan, seconds: float, rendered: bool = False) -> str:
    seeds = [r["seed"] for r in results]
    n = len(seeds)
    cross = [r for r in results if "wide-none" in r]
    out = [
        f"## {SECTION}",
        "",
        f"Command: {command_line()}",
        "",
        machine_line(),
        f"Seeds {', '.join(map(str, seeds))}. Fashion-MNIST, all 10 classes; every network the `small` preset "
        f"with leaky ReLU (slope {SLOPE}). v1: seed s, a seeded {_half(plan):,}-image half of the training set, "
        f"{plan.epochs_old} epochs (the steps of {plan.epochs_old * _half(plan) / (plan.limit or 60_000):g} epochs on all images). v2: seed s + 100, {plan.limit or 60_000:,} images, {plan.epochs} epochs from "
        f"scratch, or {plan.ft_epochs} epochs from v1's weights (fine-tuning, LQF). PC terms run v1 live on "
        f"each augmented view, except the row marked cached (`--cache-old-logits`). Measured on the 10,000 test images; retrieval: queries index % 5 "
        f"== 0 (2,000), gallery the rest (8,000). Mean ± sample standard deviation over {n} seed(s). "
        + (
            "Rendered from the seeds' report.json files, which the last measuring run of the same options wrote "
            "(`--render-only`: nothing trained or measured but the curve)."
            if rendered
            else f"This run took {seconds / 60:.0f} min (models already on disk are reused, not retrained)."
        ),
        "",
        "### Convergence",
        "",
        "Test error of one cosine schedule per length (seed 0), v1 on its 30,000 images and the untreated v2 on "
        "60,000:",
        "",
        "| epochs | v1 error | v1 train s | v2 error | v2 train s |",
        "|---|---|---|---|---|",
    ]
    for e in sorted({*CURVE["v1"], *CURVE["v2"]}):
        a, b = curve.get(f"v1-e{e}"), curve.get(f"v2-e{e}")
        if a is None and b is None:
            continue
        fmt = lambda d: (f"{100 * d['error']:.2f}%", f"{d['seconds']:.0f}") if d else ("—", "—")  # noqa: E731
        out.append(f"| {e} | " + " | ".join([*fmt(a), *fmt(b)]) + " |")
    out += [
        "",
        curve_reading(curve, plan),
        "",
        "### Classification flips, same architecture",
        "",
        "NFR: test images v1 classifies right and the new model wrong. Cut and error change against the "
        "untreated v2 of the same seed. Retrieval NFR / PFR: queries whose top-1 had the query's class under "
        "v1/v1 and not under new/new (each model on its own gallery), and the reverse.",
        "",
        "| v2 | error | NFR | rel. NFR | NFR cut | error change | retrieval NFR (new/new) | retrieval PFR | "
        "mAP new/new |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, label in {**SCRATCH, **FINETUNE}.items():
        none = name == "none"
        out.append(
            f"| {tagged(results, name, label)} | {col(results, name, 'err_new')} | {col(results, name, 'nfr')} | "
            f"{col(results, name, 'rel_nfr', pct=False, digits=3)} | "
            f"{'—' if none else col(results, name, 'nfr_cut', digits=1)} | "
            f"{'—' if none else col(results, name, 'err_delta')} | "
            f"{col(results, name, 'new_new', 'nfr')} | {col(results, name, 'new_new', 'pfr')} | "
            f"{col(results, name, 'new_new', 'mAP', pct=False, digits=3)} |"
        )
    out += [
        "",
        f"v1's error: {col(results, 'none', 'err_old')}; v1/v1 mAP {col(results, 'none', 'old_old', 'mAP', pct=False, digits=3)}, "
        f"top-1 {col(results, 'none', 'old_old', 'top1', pct=False, digits=3)}.",
        "",
        "Per seed (NFR / error):",
        "",
        "| v2 | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|" + "---|" * n,
    ]
    for name in {**SCRATCH, **FINETUNE}:
        out.append(
            f"| {name} | "
            + " | ".join(
                f"{100 * r[name]['nfr']:.2f}% / {100 * r[name]['err_new']:.2f}%" if name in r else "—"
                for r in results
            )
            + " |"
        )
    out += [
        "",
        f"### Cross-architecture: v1 `small` (width 8) → v2 `small` at width {WIDE}",
        "",
        f"Seeds {', '.join(str(r['seed']) for r in cross)}."
        if cross
        else "Not run in this run (`--cross-seeds` named no seed).",
        "",
    ]
    if cross:
        out += [
            "| v2 | error | NFR | rel. NFR | NFR cut | error change | retrieval NFR (new/new) | mAP new/new |",
            "|---|---|---|---|---|---|---|---|",
        ]
    for name, label in CROSS.items() if cross else ():
        none = name == "wide-none"
        out.append(
            f"| {label} | {col(cross, name, 'err_new')} | {col(cross, name, 'nfr')} | "
            f"{col(cross, name, 'rel_nfr', pct=False, digits=3)} | "
            f"{'—' if none else col(cross, name, 'nfr_cut', digits=1)} | "
            f"{'—' if none else col(cross, name, 'err_delta')} | {col(cross, name, 'new_new', 'nfr')} | "
            f"{col(cross, name, 'new_new', 'mAP', pct=False, digits=3)} |"
        )
    out += [
        "",
        "### Search against v1's gallery (new/old)",
        "",
        "New queries on the gallery v1 embedded, no backfill. Retrieval NFR / PFR against v1/v1's top-1.",
        "",
        "| v2 | top-1 new/old | mAP new/old | retrieval NFR | retrieval PFR | classification error |",
        "|---|---|---|---|---|---|",
        f"| v1 itself (old/old) | {col(results, 'none', 'old_old', 'top1', pct=False, digits=3)} | "
        f"{col(results, 'none', 'old_old', 'mAP', pct=False, digits=3)} | — | — | {col(results, 'none', 'err_old')} |",
    ]
    for name, label in {
        **SEARCH,
        **{k: FINETUNE[k] for k in ("ft", "lqf", "lqf-linear", f"bcwi-ft-a{ALPHAS[-1]}")},
    }.items():
        out.append(
            f"| {tagged(results, name, label)} | {col(results, name, 'new_old', 'top1', pct=False, digits=3)} | "
            f"{col(results, name, 'new_old', 'mAP', pct=False, digits=3)} | {col(results, name, 'new_old', 'nfr')} | "
            f"{col(results, name, 'new_old', 'pfr')} | {col(results, name, 'err_new')} |"
        )
    out += ["", "### Against the aims", ""] + verdicts(results)
    names = dict.fromkeys(k for r in results for k in r["train_seconds"])
    ts = {
        k: statistics.mean(r["train_seconds"][k] or 0.0 for r in results if k in r["train_seconds"])
        for k in names
    }
    out += [
        "",
        f"Mean training seconds per model ({plan.threads} thread(s) each, {plan.jobs} training(s) at a time): "
        + ", ".join(f"{k} {v:.0f}" for k, v in ts.items() if v)
        + ".",
        "",
    ]
    return "\n".join(out)


def verdicts(results: list[dict]) -> list[str]:
    lines = []
    treated = [n for n in [*SCRATCH, *FINETUNE] if n != "none"]
    ok = [n for n in treated if mean(results, n, "err_delta") <= 0.002]
    best = max(ok, key=lambda n: mean(results, n, "nfr_cut")) if ok else None
    top = max(treated, key=lambda n: mean(results, n, "nfr_cut"))
    if best is not None:
        cut, derr = mean(results, best, "nfr_cut"), mean(results, best, "err_delta")
        seeds = [r for r in results if best in r]
        # Judged per seed as well as on the mean: the aim says "on 3 seeds", and the untreated v2's error alone
        # varies between seeds by more than the 0.2-point bound.
        each = [r[best]["nfr_cut"] >= 0.60 and r[best]["err_delta"] <= 0.002 for r in seeds]
        met = cut >= 0.60
        verdict = (
            "**missed**"
            if not met
            else f"met on the mean of {len(seeds)} seed(s)"
            + ("" if len(seeds) >= 3 else "; the aim asks for 3")
            + f", and on {sum(each)} of {len(seeds)} seed(s) taken one by one"
        )
        per_seed = "; ".join(
            f"seed {r['seed']} {100 * r[best]['nfr_cut']:.1f}% at {100 * r[best]['err_delta']:+.2f}"
            for r in seeds
        )
        spread = statistics.stdev(r["none"]["err_new"] for r in results) if len(results) > 1 else 0.0
        lines.append(
            f"- **NFR cut ≥ 60% at an error change ≤ +0.2 points, same architecture:** among the rows within "
            f"+0.2 points of the untreated v2's error on average, the largest cut is {LABEL[best]}'s, "
            f"{100 * cut:.1f}% at {100 * derr:+.2f} points: aim {verdict} (per seed: {per_seed} points). The "
            f"untreated v2's error itself varies by ± {100 * spread:.2f} points between seeds."
        )
    else:
        lines.append(
            "- **NFR cut ≥ 60% at ≤ +0.2 points:** no treated row stays within +0.2 points: aim **missed**."
        )
    if top != best:
        lines.append(
            f"  The largest cut at any error is {LABEL[top]}'s, {100 * mean(results, top, 'nfr_cut'):.1f}% at "
            f"{100 * mean(results, top, 'err_delta'):+.2f} points."
        )
    fd = max(
        (n for n in SCRATCH if n not in ("none", "fd-lm-x20-cached")),
        key=lambda n: mean(results, n, "nfr_cut"),
    )
    lines.append(
        f"- **Focal distillation alone** (v2 from scratch, teacher live): the largest cut is {LABEL[fd]}'s, "
        f"{100 * mean(results, fd, 'nfr_cut'):.1f}% at {100 * mean(results, fd, 'err_delta'):+.2f} points; the "
        f"cached teacher's row: {100 * mean(results, 'fd-lm-x20-cached', 'nfr_cut'):.1f}% at "
        f"{100 * mean(results, 'fd-lm-x20-cached', 'err_delta'):+.2f}."
    )
    scale = {k: statistics.mean(r["bn_scale"][k] for r in results) for k in ("ft", "ft-fd")}
    lines.append(
        f"- **BCWI + focal distillation:** v1 mixed with the network fine-tuned with fd-lm 20x errs "
        f"{100 * mean(results, f'bcwi-ftfd-a{ALPHAS[0]}', 'err_new'):.1f}% at α {ALPHAS[0]}. That network's "
        f"BatchNorm running variances are {scale['ft-fd']:.0f}x v1's on average (plain fine-tuning: "
        f"{scale['ft']:.2f}x): the strong term grew its BatchNorm-invariant weights, and a linear mix of two "
        "scales is neither network."
    )
    cross = [r for r in results if "wide-none" in r]
    if cross:
        c = mean(cross, "wide-fd-lm-x20", "nfr_cut")
        lines.append(
            f"- **Cross-architecture** (width 8 → {WIDE}; {len(cross)} seed(s)): fd-lm 20x's NFR cut is "
            f"{100 * c:.1f}% at {100 * mean(cross, 'wide-fd-lm-x20', 'err_delta'):+.2f} points."
        )
    cut = mean(results, "bct-pc", "retrieval_nfr_cut_vs_bct")
    d1 = mean(results, "bct-pc", "new_old", "top1") - mean(results, "bct", "new_old", "top1")
    dm = mean(results, "bct-pc", "new_old", "mAP") - mean(results, "bct", "new_old", "mAP")
    met = cut >= 0.5 and d1 >= 0 and dm >= 0
    lines.append(
        f"- **BCT + PC child: retrieval NFR cut ≥ 50% against the BCT child at equal or better new/old top-1 "
        f"and mAP:** cut {100 * cut:.1f}%, top-1 {d1:+.3f}, mAP {dm:+.3f}: aim {'met' if met else '**missed**'}."
    )
    # LQF against the other rows on the seeds that have it: each seed's v1 differs.
    results = [r for r in results if "lqf" in r]
    e_lqf, e_lin, e_ft = (mean(results, n, "err_new") for n in ("lqf", "lqf-linear", "ft"))
    lines.append(
        f"- **LQF against full fine-tuning** (the claim that a linear update performs as well; "
        f"{len(results)} seed(s)): error "
        f"{100 * e_lin:.2f}% (linear model) and {100 * e_lqf:.2f}% (saved network) against {100 * e_ft:.2f}% "
        f"for fine-tuning, {100 * mean(results, 'none', 'err_new'):.2f}% for v2 from scratch, "
        f"{100 * mean(results, 'none', 'err_old'):.2f}% for v1. NFR {100 * mean(results, 'lqf-linear', 'nfr'):.2f}% "
        f"(linear) against {100 * mean(results, 'ft', 'nfr'):.2f}% (fine-tuning); new/old mAP "
        f"{mean(results, 'lqf-linear', 'new_old', 'mAP'):.3f} (linear) against v1/v1's "
        f"{mean(results, 'none', 'old_old', 'mAP'):.3f}: claim "
        + ("holds" if e_lin <= e_ft + 0.002 else "**not reproduced** here")
        + "."
    )
    return lines


LABEL = {**SCRATCH, **FINETUNE, **CROSS, **SEARCH}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=24, help="the from-scratch v2s' epochs")
    p.add_argument("--epochs-old", type=int, default=48, help="v1's epochs (on half the images)")
    p.add_argument("--ft-epochs", type=int, default=8, help="fine-tuning and LQF epochs, from v1's weights")
    p.add_argument(
        "--cross-seeds", type=int, nargs="*", default=None, help="seeds of the cross-arch rows (all)"
    )
    p.add_argument(
        "--curve", action=argparse.BooleanOptionalAction, default=True, help="seed 0's length sweep"
    )
    p.add_argument(
        "--flips-only-seeds", type=int, nargs="*", default=[], help="seeds without the LQF and BCT rows"
    )
    p.add_argument("--jobs", type=int, default=2, help="trainings at a time (one process each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training")
    p.add_argument("--limit", type=int, default=None, help="v2's training slice (v1: half of it); smoke runs")
    p.add_argument("--quick", action="store_true", help="2 epochs each on a 4k slice; prints only")
    p.add_argument(
        "--render-only",
        action="store_true",
        help="train and measure nothing: write the section from each seed's saved report.json (and the curve)",
    )
    p.add_argument("--write", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "pc")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.epochs_old, args.ft_epochs = 2, 2, 1
        args.limit, args.curve = args.limit or 4000, False
    cross = tuple(args.seeds if args.cross_seeds is None else args.cross_seeds)
    sub = "quick" if args.quick else ("converged" if not args.limit else f"limit{args.limit}")
    plan = Plan(
        args.jobs,
        args.epochs,
        args.epochs_old,
        args.ft_epochs,
        cross,
        args.limit,
        args.threads,
        args.out / sub,
        tuple(args.flips_only_seeds),
    )
    if args.render_only:
        missing = [s for s in args.seeds if not (plan.root / f"seed{s}" / "report.json").is_file()]
        if missing:
            p.error(
                f"--render-only: no report.json for seed(s) {', '.join(map(str, missing))} under {plan.root}; "
                "run once without --render-only (same options) to measure them"
            )
    write = (not args.quick and not args.limit) if args.write is None else args.write
    t0 = time.perf_counter()
    every = [j for s in args.seeds for j in seed_jobs(plan, s) if plan.wants(j)]
    # Cross-architecture models last: the same-architecture rows of every seed come first.
    jobs = [j for j in every if j.name not in CROSS_JOBS]
    if args.curve and 0 in args.seeds:
        jobs += curve_jobs(plan, 0)
    jobs += [j for j in every if j.name in CROSS_JOBS]
    if not args.render_only:
        run_jobs(jobs, args.jobs)
    torch.set_num_threads(max(1, args.jobs * args.threads))
    test = load_split(None, "test")
    assert isinstance(test, Dataset)  # Fashion-MNIST's IDX files
    results = []
    for seed in args.seeds:
        report = plan.root / f"seed{seed}" / "report.json"
        if args.render_only:
            r = json.loads(report.read_text())
            if "bn_scale" not in r:  # reports written before the figure existed
                r["bn_scale"] = bn_scale(plan, seed)
        else:
            r = measure_seed(plan, seed, test, ALPHAS) | {"bn_scale": bn_scale(plan, seed)}
            report.write_text(json.dumps(r, indent=1))
        results.append(r)
        print(
            f"seed {seed}: "
            + ", ".join(
                f"{n} NFR {100 * r[n]['nfr']:.2f}% err {100 * r[n]['err_new']:.2f}%" for n in LABEL if n in r
            )
            + f" (v1 err {100 * r['none']['err_old']:.2f}%)",
            flush=True,
        )
    curve = curve_errors(plan, 0, test) if 0 in args.seeds else {}
    text = render(results, curve, plan, time.perf_counter() - t0, args.render_only)
    print(text)
    if write:
        write_section(SECTION, text)
        print("wrote the section to BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
