"""ONNX old model: the team's production model as an ONNX export, registered, served and trained against.

v1 (classes 0-4; bench/compat.py's seed-0 v1 or bench.common's pair when present, else trained here) is
exported to ONNX by torch (embedding + logits, and embedding only) and registered with `graceful
register-onnx` (the head fitted on the 30,000 training images of its classes). Measured in one run:
- max |diff| of the ONNX version's embeddings against torch v1's on the 10,000 test images;
- embedding throughput, onnxruntime against torch, one thread each, the same batches, alternating rounds;
- the head: least squares on the export's logits against class means (agreement with the export's argmax);
- v2 (classes 0-9, the default BCT recipe) trained against the ONNX folder with --threads 1, evaluated on
  the retrieval protocol: new/old against old/old top-1 and mAP.
Writes "## ONNX old model" to BENCHMARKS.md.

    .venv/bin/python -m bench.onnx                 # full protocol (v2: 8 epochs, 13-25 min on 1 thread)
    .venv/bin/python -m bench.onnx --quick         # a 5k slice, 1 epoch; prints only
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import COMPAT_SEED0, REPO, command_line, machine_line, write_section
from trainer.artifact import LoadedModel, embed_images, load_model, predict_labels
from trainer.data import load_split
from trainer.evaluate import evaluate_models
from trainer.onnx_model import export_onnx
from trainer.register_onnx import RegisterConfig, register_onnx
from trainer.train import TrainConfig, reusable, train

SECTION = "ONNX old model"
OUT = REPO / "bench" / "out" / "onnx"


def find_v1(root: Path, quick: bool, threads: int) -> Path:
    """A trained v1 (classes 0-4): bench/compat.py's or bench.common's pair's when present (full runs)."""
    if not quick:
        for folder in (COMPAT_SEED0 / "v1", REPO / "bench" / "out" / "pair" / "full" / "v1"):
            if (folder / "card.json").exists():
                return folder
    cfg = TrainConfig(
        out=str(root / "v1"),
        classes="0-4",
        epochs=1 if quick else 6,
        limit=5000 if quick else None,
        threads=threads,
    )
    if not reusable(cfg):
        print(f"training {cfg.out}", flush=True)
        train(cfg)
    return Path(cfg.out)


def throughput(models: dict[str, LoadedModel], images: np.ndarray, rounds: int) -> dict[str, float]:
    """Images/s of ``embed_images`` per model: the same images, rounds alternating, the best round each."""
    best = dict.fromkeys(models, 0.0)
    for _ in range(rounds):
        for name, m in models.items():
            t0 = time.perf_counter()
            embed_images(m, images, batch_size=256)
            best[name] = max(best[name], len(images) / (time.perf_counter() - t0))
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="5k slice, 1 epoch; prints only")
    p.add_argument(
        "--epochs", type=int, default=8, help="epochs of v2 against the ONNX folder (the recipe's 8)"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3, help="throughput rounds (the best is kept)")
    p.add_argument("--no-write", action="store_true", help="print the section, do not write BENCHMARKS.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    write = not (args.quick or args.no_write)
    t_start = time.perf_counter()
    root = OUT / ("quick" if args.quick else "full")
    models = root / "models"
    models.mkdir(parents=True, exist_ok=True)

    v1_dir = find_v1(root, args.quick, args.threads)
    v1 = load_model(v1_dir)
    shape = v1.preprocess.shape
    res: dict = {"v1": str(v1_dir.relative_to(REPO)), "v1_epochs": v1.card.train_config.get("epochs")}

    registered: dict[str, LoadedModel] = {}
    for name, logits in (("v1-onnx", True), ("v1-onnx-emb", False)):
        onnx_file = export_onnx(v1.model, shape, root / f"{name}.onnx", logits=logits)
        shutil.rmtree(models / name, ignore_errors=True)
        prep = v1.preprocess
        result = register_onnx(
            RegisterConfig(
                model=str(onnx_file),
                out=str(models / name),
                size=[prep.height, prep.width],
                channels=prep.channels,
                mean=list(prep.mean),
                std=list(prep.std),
                classes="0-4",
                sample=5000 if args.quick else None,
                threads=args.threads,
            )
        )
        registered[name] = load_model(models / name)
        res[name] = {
            "bytes": onnx_file.stat().st_size,
            "register_s": result.seconds,
            "head": result.card.metrics["head"],
        }
        print(f"registered {name} in {result.seconds:.1f}s: {result.card.metrics['head']}", flush=True)
    onnx_v1 = registered["v1-onnx"]

    test = load_split(None, "test")
    if args.quick:
        test = test.take(2000, seed=0)
    a, b = embed_images(v1, test.images), embed_images(onnx_v1, test.images)
    res["max_abs_diff"] = float(np.abs(a - b).max())
    res["label_agreement"] = float((predict_labels(v1, a) == predict_labels(onnx_v1, b)).mean())
    res["images"] = len(test)
    print(f"max |diff| {res['max_abs_diff']:.2e} over {len(test)} images", flush=True)
    res["throughput"] = throughput({"torch": v1, "onnxruntime": onnx_v1}, test.images, args.rounds)
    print(f"throughput {res['throughput']}", flush=True)

    cfg = TrainConfig(
        out=str(models / "v2"),
        old=str(models / "v1-onnx"),
        bct="full",
        epochs=1 if args.quick else args.epochs,
        limit=5000 if args.quick else None,
        threads=args.threads,
    )
    t0 = time.perf_counter()
    if not reusable(cfg):
        print(f"training {cfg.out} against the ONNX folder", flush=True)
        train(cfg)
    res["v2_train_s"] = time.perf_counter() - t0
    v2 = load_model(models / "v2")
    res["v2_epochs"] = v2.card.train_config["epochs"]
    res["v2_images_per_second"] = v2.card.train_config.get("images_per_second")
    report = evaluate_models([onnx_v1, v2, v1], test)
    res["matrix"] = {k: {m: v[m] for m in ("top1", "top5", "mAP")} for k, v in report.matrix.items()}
    res["bct"] = report.bct.get("v2/v1-onnx")
    (root / "report.json").write_text(json.dumps(res, indent=1, default=float))

    text = render(res, time.perf_counter() - t_start, args)
    print(text)
    if write:
        write_section(SECTION, text)
        print("wrote the section to BENCHMARKS.md")
    return 0


def render(res: dict, seconds: float, args: argparse.Namespace) -> str:
    m = res["matrix"]
    old_old, new_old, new_new = m["v1-onnx/v1-onnx"], m["v2/v1-onnx"], m["v2/v2"]
    torch_old = m["v1/v1"]
    tp = res["throughput"]
    head, head_emb = res["v1-onnx"]["head"], res["v1-onnx-emb"]["head"]
    passes = new_old["top1"] > old_old["top1"] and new_old["mAP"] > old_old["mAP"]
    out = [
        f"## {SECTION}",
        "",
        f"Command: {command_line()}",
        "",
        machine_line(),
        f"Whole run {seconds / 60:.1f} min (v2's training included when not reused).",
        "",
        f"v1 (`{res['v1']}`, classes 0-4, {res['v1_epochs']} epochs) exported by `torch.onnx.export` "
        f"(TorchScript exporter, dynamic batch; {res['v1-onnx']['bytes'] / 1024:.0f} KiB) and registered "
        "with `graceful register-onnx` (graph checked and test-run, file checksummed, head fitted on the "
        f"{head['sample']:,} training images of classes 0-4 in {res['v1-onnx']['register_s']:.1f} s).",
        "",
        "| | figure |",
        "|---|---|",
        f"| max \\|diff\\| of the embeddings, onnxruntime vs torch, {res['images']:,} test images | "
        f"{res['max_abs_diff']:.2e} (aim < 1e-4: {'met' if res['max_abs_diff'] < 1e-4 else 'missed'}) |",
        f"| predicted labels equal (ONNX version's head vs torch v1's) | {res['label_agreement']:.4f} |",
        f"| embedding throughput, torch, {args.threads} thread(s), batches of 256 | {tp['torch']:,.0f} images/s |",
        f"| embedding throughput, onnxruntime, {args.threads} thread(s), batches of 256 | "
        f"{tp['onnxruntime']:,.0f} images/s ({tp['onnxruntime'] / tp['torch']:.2f}x torch) |",
        "",
        "The head (the old classifier BCT trains against). With a logits output its rows are fitted by least "
        "squares to the logits on the embeddings; graceful's own cosine head is linear in unit embeddings, so "
        "this recovers it, where class means only approximate it. Agreement of each head's argmax with the "
        "export's logits on the registration sample:",
        "",
        "| export | head chosen | least squares | class means | relative residual |",
        "|---|---|---|---|---|",
        f"| embedding + logits | {head['method']} | {head['lstsq_agreement_with_logits']:.4f} | "
        f"{head['class_mean_agreement_with_logits']:.4f} | {head['relative_residual']:.1e} |",
        f"| embedding only | {head_emb['method']} (BCT's synthesised classifier) | - | - | - |",
        "",
        f"v2 (classes 0-9, the default BCT recipe, {res['v2_epochs']} epochs, --threads {args.threads}, "
        f"{res['v2_images_per_second']} images/s) trained with `--old` the ONNX folder: the old embeddings "
        "come from onnxruntime, the old head from the registered rows. Retrieval protocol (2,000 test "
        "queries over the 8,000-image gallery):",
        "",
        "| query / gallery | top-1 | top-5 | mAP |",
        "|---|---|---|---|",
        f"| old/old (v1-onnx/v1-onnx) | {old_old['top1']:.4f} | {old_old['top5']:.4f} | {old_old['mAP']:.4f} |",
        f"| old/old (torch v1/v1, for reference) | {torch_old['top1']:.4f} | {torch_old['top5']:.4f} | "
        f"{torch_old['mAP']:.4f} |",
        f"| **new/old (v2/v1-onnx)** | **{new_old['top1']:.4f}** | {new_old['top5']:.4f} | "
        f"**{new_old['mAP']:.4f}** |",
        f"| new/new (v2/v2) | {new_new['top1']:.4f} | {new_new['top5']:.4f} | {new_new['mAP']:.4f} |",
        "",
        f"new/old > old/old on top-1 and mAP: **{'met' if passes else 'missed'}** "
        f"(top-1 {new_old['top1'] - old_old['top1']:+.4f}, mAP {new_old['mAP'] - old_old['mAP']:+.4f}).",
    ]
    if res.get("bct") and res["bct"].get("update_gain"):
        gain = res["bct"]["update_gain"]
        out.append(
            "Update gain (share of the full upgrade's benefit with no backfill): "
            + ", ".join(f"{k} {v:.3f}" for k, v in gain.items() if v is not None)
            + "."
        )
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
