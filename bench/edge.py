"""Edge model benchmark: a small model trained with BCT into a big model's embedding space.

A device embeds queries with the small model and searches the gallery the big model built (heterogeneous
search, Duggal et al., CVPR 2021). Big model: ``resnet`` on classes 0-9 (no BCT); small: ``--arch small``
trained with BCT against it (`graceful train --arch small --old BIG --bct`), and for reference a small model
trained alone. Quality on the standard protocol (test split, queries = index % 5 == 0, gallery = the rest);
parameter counts and embedding throughput (images/s at batch 1 and batch 256). Writes "## Edge model" to
BENCHMARKS.md.

    .venv/bin/python -m bench.edge
    .venv/bin/python -m bench.edge --quick        # 1 epoch on a 5k slice; prints only

The big model is ``--big DIR`` if given, else bench/pc.py's seed-0 v1 (`resnet`, classes 0-9) when it exists,
else one trained here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import REPO, command_line, machine_line, write_section
from trainer.artifact import LoadedModel, load_model, read_card
from trainer.data import load_split
from trainer.errors import ModelCardError
from trainer.evaluate import METRICS, evaluate_models
from trainer.model import count_parameters
from trainer.train import TrainConfig, reusable, train

SECTION = "Edge model"
PC_BIG = REPO / "bench" / "out" / "pc" / "full" / "seed0" / "v1"


def throughput(loaded: LoadedModel, images: np.ndarray, batch: int, seconds: float) -> float:
    """Images per second of ``embed`` (preprocessing included) at ``batch``, run for about ``seconds``."""
    prep, model = loaded.preprocess, loaded.model
    x = images[:batch]
    with torch.inference_mode():
        for _ in range(3):
            model.embed(prep(x))
        rates, t_end = [], time.perf_counter() + seconds
        while time.perf_counter() < t_end or len(rates) < 5:
            t0 = time.perf_counter()
            model.embed(prep(x))
            rates.append(len(x) / (time.perf_counter() - t0))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--big", type=Path, default=None, help="the big model's folder (classes 0-9)")
    p.add_argument("--epochs", type=int, default=4, help="epochs of each model trained here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--timing-seconds", type=float, default=5.0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--write", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "edge")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.limit = 1, args.limit or 5000
    write = (not args.quick and not args.limit) if args.write is None else args.write
    t0 = time.perf_counter()
    root = args.out / ("quick" if args.quick else "full")
    common = dict(seed=args.seed, limit=args.limit, threads=args.threads, epochs=args.epochs)
    big_cfg = TrainConfig(out=str(root / "big"), **common)
    big_dir, source = Path(big_cfg.out), "trained here"
    for cand, where in (
        (args.big, "given with --big"),
        (None if args.quick else PC_BIG, "bench/pc.py's seed-0 v1"),
    ):
        try:
            if cand is not None and read_card(cand):
                big_dir, source = cand, where
                break
        except ModelCardError:
            continue
    cfgs = ([big_cfg] if big_dir == Path(big_cfg.out) else []) + [
        TrainConfig(out=str(root / "small"), arch="small", old=str(big_dir), bct="full", **common),
        TrainConfig(out=str(root / "small-indep"), arch="small", **{**common, "seed": args.seed + 1}),
    ]
    for cfg in cfgs:
        if reusable(cfg):
            print(f"reusing {cfg.out}", flush=True)
            continue
        t1 = time.perf_counter()
        train(cfg)
        print(f"trained {cfg.out} in {time.perf_counter() - t1:.0f} s", flush=True)
    big, small, alone = load_model(big_dir), load_model(root / "small"), load_model(root / "small-indep")
    # The gallery model first: its classes (all ten) count as "old" in the split metrics.
    big_v, small_v, alone_v = big.version, small.version, alone.version
    test = load_split(None, "test")
    report = evaluate_models([big, small, alone], test).to_json(include_flipped=False)
    m = report["matrix"]

    if args.threads:
        torch.set_num_threads(args.threads)
    busy = os.getloadavg()
    images = test.images[:256]
    speed = {
        v.version: {b: throughput(v, images, b, args.timing_seconds) for b in (1, 256)} for v in (big, small)
    }
    busy_after = os.getloadavg()
    params = {v.version: count_parameters(v.model) for v in (big, small)}
    (root / "report.json").write_text(
        json.dumps({"report": report, "speed": speed, "params": params}, indent=1)
    )

    def row(label: str, key: str) -> str:
        c = m[key]
        return f"| {label} | " + " | ".join(f"{c[k]:.4f}" for k in METRICS) + " |"

    ratio_map = m[f"{small_v}/{big_v}"]["mAP"] / m[f"{big_v}/{big_v}"]["mAP"]
    text = "\n".join(
        [
            f"## {SECTION}",
            "",
            f"Command: {command_line()}",
            "",
            machine_line(),
            f"Big model: `{big.card.arch['name']}` (width {big.card.arch['width']}, {big.card.arch['stages']} stages), "
            f"classes 0-9, no BCT ({source}, {big.card.train_config.get('epochs')} epochs). Small model: `small` (width "
            f"{small.card.arch['width']}, {small.card.arch['stages']} stages), classes 0-9, {args.epochs} epochs, "
            f"`graceful train --arch small --old BIG --bct` (full recipe); small alone: same architecture without BCT. "
            f"Test split: 2,000 queries against 8,000 gallery images, full ranking. Total time "
            f"{(time.perf_counter() - t0) / 60:.0f} min.",
            "",
            "| query model / gallery model | top-1 | top-5 | mAP |",
            "|---|---|---|---|",
            row("big / big (the gallery as built)", f"{big_v}/{big_v}"),
            row("**small (BCT) / big**: device queries, server gallery", f"{small_v}/{big_v}"),
            row("small (BCT) / small (BCT)", f"{small_v}/{small_v}"),
            row("small alone / small alone", f"{alone_v}/{alone_v}"),
            row("small alone / big (no BCT: incompatible)", f"{alone_v}/{big_v}"),
            "",
            f"small/big reaches {ratio_map:.1%} of big/big's mAP.",
            "",
            "| model | parameters | images/s, batch 1 | images/s, batch 256 |",
            "|---|---|---|---|",
            *(
                f"| {name} | {params[v.version]:,} | {speed[v.version][1]:,.0f} | {speed[v.version][256]:,.0f} |"
                for name, v in (("big", big), ("small", small))
            ),
            "",
            f"The small model has {params[small_v] / params[big_v]:.1%} of the big one's parameters and embeds "
            f"{speed[small_v][1] / speed[big_v][1]:.1f}x (batch 1) / {speed[small_v][256] / speed[big_v][256]:.1f}x "
            f"(batch 256) as many images per second (torch on CPU, {torch.get_num_threads()} thread(s), median over "
            f"{args.timing_seconds:g} s per setting, preprocessing included). Load average while timing: "
            f"{busy[0]:.1f} before, {busy_after[0]:.1f} after"
            + (
                " (other benchmarks were running: absolute rates are deflated, the ratios less so)."
                if max(busy[0], busy_after[0]) > 1.5
                else " (machine otherwise idle)."
            ),
            "",
        ]
    )
    print(text)
    if write:
        write_section(SECTION, text)
        print("wrote the section to BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
