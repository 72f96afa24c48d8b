"""Library backbones benchmark: a timm network trained with BCT against the preset v1.

The old model is bench/common.py's v1 (preset ``resnet``, classes 0-4, 28x28 gray). Two new models are trained
with the full BCT recipe against it on the same budget (``--epochs`` on a seeded ``--limit`` slice of the
training set, ``--threads`` threads): the preset ``resnet`` and a library backbone (``--arch``, default
timm:resnet18, random init). Each is read on the retrieval protocol (trainer/evaluate.py: test queries
index % 5 == 0 against the rest): new/old (queries by the new model, gallery by v1) against old/old, the BCT
criterion, and new/new; with training and embedding images/s and parameter counts. Writes the
"Library backbones" section of BENCHMARKS.md.

Runs in the backbones venv (timm; `bash scripts/install-backbones.sh`):

    .venv-backbones/bin/python -m bench.backbones                 # 2 epochs on 20k images, 1 thread
    .venv-backbones/bin/python -m bench.backbones --quick         # 1 epoch on 2k, eval on 2k; prints only

Measured: 13 min on the 2-core machine shared with other jobs, 9 of them training resnet18 (73 images/s).
Trained models are kept under bench/out/backbones/ and reused when their settings match.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import REPO, machine_line, v1_v2_models, write_section
from trainer.artifact import embed_images, load_model
from trainer.data import load_split
from trainer.model import count_parameters
from trainer.train import TrainConfig, reusable, train

SECTION = "Library backbones"


def _embed_rate(loaded, images: np.ndarray, repeats: int = 2) -> float:
    """Images/s of embed_images (preprocess + forward, batches of 256) on ``images``, best of ``repeats``."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        embed_images(loaded, images, batch_size=256)
        best = min(best, time.perf_counter() - t0)
    return len(images) / best


def _criterion(passes: dict[str, bool]) -> str:
    """BCT's criterion per metric (new/old above old/old): "passes" or "fails on top1, mAP"."""
    failed = [m for m in ("top1", "top5", "mAP") if not passes.get(m)]
    return "passes" if not failed else "fails on " + ", ".join(failed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="timm:resnet18", help="the library backbone (default timm:resnet18)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--limit", type=int, default=20_000, help="training images (a seeded slice)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-limit", type=int, default=None, help="test images for the matrix (default all)")
    p.add_argument("--quick", action="store_true", help="1 epoch on 2k, eval on 2k; prints, writes nothing")
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "backbones"))
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.limit, args.eval_limit = 1, 2000, args.eval_limit or 2000
    torch.set_num_threads(args.threads)
    import timm

    v1_dir = v1_v2_models("backbones", quick=args.quick) / "v1"
    v1 = load_model(v1_dir)
    root = Path(args.out) / ("quick" if args.quick else "full")
    common = dict(
        old=str(v1_dir),
        bct="full",
        epochs=args.epochs,
        limit=args.limit,
        threads=args.threads,
        eval_limit=args.eval_limit,
    )
    safe = args.arch.replace(":", "-")
    runs = {
        "resnet": TrainConfig(out=str(root / "preset-resnet"), arch="resnet", **common),
        args.arch: TrainConfig(out=str(root / safe), arch=args.arch, **common),
    }
    for cfg in runs.values():
        if not reusable(cfg):
            print(f"training {cfg.out} ({cfg.arch}, BCT against {v1.version})", flush=True)
            train(cfg)
    models = {name: load_model(cfg.out) for name, cfg in runs.items()}

    test = load_split(None, "test")
    if args.eval_limit:
        test = test.take(args.eval_limit, seed=0)
    rate_images = test.images[:2000]
    rows = []
    for name, new in models.items():
        # train() evaluated [v1, new] on the protocol (the same test images) and kept it in the card.
        matrix, bct = new.card.metrics["matrix"], new.card.metrics["bct"]
        old_old = matrix[f"{v1.version}/{v1.version}"]
        new_old = matrix[f"{new.version}/{v1.version}"]
        new_new = matrix[f"{new.version}/{new.version}"]
        tc = new.card.train_config
        rows.append(
            {
                "arch": name,
                "params": count_parameters(new.model),
                "old_old": old_old,
                "new_old": new_old,
                "new_new": new_new,
                "passes": bct[f"{new.version}/{v1.version}"]["passes"],
                "train_ips": tc["images_per_second"],
                "train_s": tc["seconds"],
                "embed_ips": _embed_rate(new, rate_images),
            }
        )
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("old_old", "new_new")}, default=str))
    v1_ips = _embed_rate(v1, rate_images)

    old = rows[0]["old_old"]
    lines = [
        f"## {SECTION}",
        "",
        f"A library backbone (`--arch {args.arch}`, random init) trained with the full BCT recipe against the "
        f"preset v1 ({v1.card.arch['name']}, classes 0-4, 28x28 gray; bench/common.py), next to the preset "
        f"`resnet` on the same budget: {args.epochs} epoch(s) on a seeded {args.limit:,}-image slice, "
        f"{args.threads} thread(s). Retrieval protocol on {len(test):,} test images (queries index % 5 == 0, "
        "gallery the rest); new/old: queries by the new model against the gallery embedded by v1. "
        "Embedding images/s: preprocess + forward of 2,000 28x28 images in batches of 256 (v1: "
        f"{v1_ips:,.0f}/s).",
        "",
        "| new model | parameters | new/old top-1 | new/old mAP | old/old mAP | new/new mAP | BCT criterion "
        "| train images/s | embed images/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| `{r['arch']}` | {r['params'] / 1e6:.2f} M | {r['new_old']['top1']:.4f} "
            f"| {r['new_old']['mAP']:.4f} | {r['old_old']['mAP']:.4f} | {r['new_new']['mAP']:.4f} "
            f"| {_criterion(r['passes'])} (new/old top-1 {r['new_old']['top1']:.4f} vs old/old "
            f"{old['top1']:.4f}) | {r['train_ips']:,.0f} | {r['embed_ips']:,.0f} |"
        )
    lines += [
        "",
        f"timm {timm.__version__}, torchvision {__import__('torchvision').__version__}. "
        + machine_line()
        + f" `.venv-backbones/bin/python -m bench.backbones{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`"
        " (the backbones venv: scripts/install-backbones.sh).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        write_section(SECTION, text)
        print(f"wrote the {SECTION!r} section of BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
