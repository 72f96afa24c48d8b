"""`graceful train`, `graceful eval`, `graceful adapt`, `graceful transform`, `graceful interpolate`: argument parsing and printing for people.

Every ``main(argv)`` returns an exit code and never lets a domain error escape as a traceback: a bad
argument gives one clear line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from trainer.errors import TrainerError


def _fail(msg: str) -> int:
    print(f"graceful: error: {msg}", file=sys.stderr)
    return 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line (no usage dump) and returns instead of exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise TrainerError(message)


def train_parser(prog: str = "graceful train") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Train a model version (optionally backward-compatible with --old).")
    p.add_argument("--out", required=True, help="model version folder to write (its name is the version)")
    p.add_argument("--data", default=None, help="dataset folder (IDX files or train/ test/ image folders)")
    p.add_argument("--classes", default=None, help="class subset, e.g. 0-4 (default: all)")
    p.add_argument(
        "--arch",
        default="resnet",
        help="architecture preset: resnet, resnet-wide, small; or a library backbone timm:NAME "
        "(e.g. timm:resnet18; needs the 'backbones' extra)",
    )
    p.add_argument(
        "--backbone-weights",
        default=None,
        metavar="FILE.safetensors",
        help="initial weights of a timm:NAME backbone: the library model's state dict (never a pickle)",
    )
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--stem-stride", type=int, default=None, choices=[1, 2], help="2: cheaper on large inputs")
    p.add_argument("--embedding-dim", type=int, default=128)
    p.add_argument("--scale", type=float, default=4.0, help="cosine-softmax scale of the head")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--old", default=None, help="old model version folder (for --bct)")
    p.add_argument(
        "--bct",
        nargs="?",
        const="full",
        default=None,
        choices=["full", "plain"],
        help="backward-compatible training against --old: 'full' recipe (default) or 'plain' (influence only)",
    )
    p.add_argument("--influence-weight", type=float, default=None)
    p.add_argument("--class-mean-weight", type=float, default=None)
    p.add_argument("--old-embedding-weight", type=float, default=None)
    p.add_argument(
        "--pulls-on",
        default=None,
        choices=["all", "old"],
        help="images the two L2 pulls apply to: every image, or only those of the old model's classes",
    )
    p.add_argument(
        "--influence-scale",
        type=float,
        default=None,
        help="logit scale of the influence loss (default: the old head's own)",
    )
    p.add_argument(
        "--new-rows",
        default=None,
        choices=["mean", "probe", "probe-old-head"],
        help="synthesised rows for classes the old model never saw: the old model's class mean, or "
        "refined by a linear probe in the old space (all rows free, or the old head's frozen)",
    )
    p.add_argument(
        "--pc",
        default=None,
        choices=["kd", "fd-kl", "fd-lm"],
        help="positive-congruent training against --old: focal distillation of its logits (KL or logit "
        "matching), or plain distillation 'kd'; combinable with --bct",
    )
    p.add_argument("--pc-alpha", type=float, default=None, help="focal weight on every sample (default 1)")
    p.add_argument(
        "--pc-beta",
        type=float,
        default=None,
        help="extra focal weight where the old model is right (default 5; 0 for kd)",
    )
    p.add_argument(
        "--pc-temperature", type=float, default=None, help="softmax temperature of fd-kl/kd (default 4)"
    )
    p.add_argument(
        "--pc-weight",
        type=float,
        default=None,
        help="weight of the PC term against the task loss (default 1; fd-lm 0.05)",
    )
    p.add_argument(
        "--cache-old-logits",
        action="store_true",
        help="for --pc: run --old once over the training images and look its logits (and, with --bct, its "
        "embeddings) up per batch instead of running it every step. Use it with --no-augment: the cached "
        "teacher sees each clean image, not the augmented view the new model sees, and on Fashion-MNIST that "
        "other target left the flips uncut (a warning says so)",
    )
    p.add_argument(
        "--unlabeled",
        default=None,
        metavar="DIR",
        help="unlabeled images for --bct (a gallery export, any folder of images, or a dataset folder): the "
        "new model's embedding of each is pulled towards the old model's, so classes neither model was "
        "trained on stay near where the old gallery holds them",
    )
    p.add_argument(
        "--unlabeled-limit", type=int, default=None, metavar="N", help="a seeded sample of N of them"
    )
    p.add_argument("--unlabeled-weight", type=float, default=None, help="weight of their pull (default 16)")
    p.add_argument(
        "--unlabeled-target",
        default=None,
        choices=["neighbours", "old"],
        help="pull towards the old model's embedding of the same view (default), or towards the mean of "
        "the old embeddings of each image's nearest neighbours",
    )
    p.add_argument("--unlabeled-k", type=int, default=None, help="neighbours per image (default 10)")
    p.add_argument(
        "--init-from-old",
        action="store_true",
        help="start from --old's weights (same architecture and input contract): with --bct a warm-started "
        "BCT child, alone plain fine-tuning of the old model; use a smaller --lr (0.02)",
    )
    p.add_argument(
        "--negative-slope",
        type=float,
        default=None,
        metavar="S",
        help="leaky ReLU with slope S in the preset networks (default: ReLU; with --lqf: the old model's, "
        "another value swaps it)",
    )
    p.add_argument(
        "--lqf",
        action="store_true",
        help="LQF: fine-tune --old linearised around its weights (first-order Taylor expansion), with a "
        "least-squares loss and K-FAC preconditioning; same architecture as --old. --lr is then the fraction "
        "of each batch's exact optimal step (1: the optimum; try 0.5-1)",
    )
    p.add_argument(
        "--lqf-target",
        type=float,
        default=None,
        help="--lqf least-squares targets: this times one-hot (default: the head's scale)",
    )
    p.add_argument(
        "--lqf-damping",
        type=float,
        default=None,
        help="--lqf K-FAC damping, a fraction of each factor's mean eigenvalue (default 1)",
    )
    p.add_argument("--limit", type=int, default=None, help="train on a seeded slice of N images")
    p.add_argument(
        "--eval-limit", type=int, default=None, help="evaluate the card's metrics on N test images"
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-augment", dest="augment", action="store_false")
    # The new model's input contract (its card's preprocess) and where it trains.
    p.add_argument(
        "--size", default=None, metavar="N|HxW", help="input size (default: IDX data's own; folders 64)"
    )
    p.add_argument("--channels", type=int, default=None, choices=[1, 3], help="default: IDX 1, folders 3")
    p.add_argument("--resize", default=None, choices=["fit", "pad", "stretch"], help="default fit")
    p.add_argument(
        "--mean",
        type=float,
        nargs="+",
        default=None,
        help="per channel, of [0, 1] pixels (default: Fashion-MNIST's for 1 channel, ImageNet's for 3)",
    )
    p.add_argument("--std", type=float, nargs="+", default=None, help="per channel (default: as --mean)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="image-folder decoding processes (default: CPUs-1, 1-4; 0: none)",
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def eval_parser(prog: str = "graceful eval") -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog,
        description="Compatibility matrix, BCT criterion, negative flips and retrieval flips (new/old and "
        "new/new against old/old) of model versions.",
    )
    p.add_argument("models", nargs="+", help="model version folders, oldest first")
    p.add_argument("--data", default=None)
    p.add_argument("--json", required=True, help="write the report here")
    p.add_argument("--plot", default=None, help="write a PNG heatmap here")
    p.add_argument("--limit", type=int, default=None, help="evaluate on a seeded slice of N test images")
    p.add_argument("--old-classes", default=None, help="classes counted as old (default: the first model's)")
    p.add_argument(
        "--show-flips",
        type=int,
        default=20,
        help="list this many negative flips per pair (the JSON keeps them all)",
    )
    return p


def _sample_size(v: str) -> int | None:
    if v == "all":
        return None
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of items or 'all', got {v!r}") from None
    if n < 2:
        raise argparse.ArgumentTypeError(f"expected at least 2 items, got {n}")
    return n


def adapt_parser(prog: str = "graceful adapt") -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog,
        description="Fit an adapter from a new model's embedding space into an old one's, "
        "saved as a model version that serves over the old gallery.",
    )
    p.add_argument("--new", required=True, help="the new model version folder (trained without BCT)")
    p.add_argument(
        "--old", required=True, help="the old model version folder (whose space the gallery is in)"
    )
    p.add_argument(
        "--out", required=True, help="adapter version folder to write, next to --new (same models dir)"
    )
    p.add_argument("--kind", default="procrustes", choices=["procrustes", "affine", "mlp"])
    p.add_argument(
        "--sample",
        type=_sample_size,
        default=5000,
        help="items embedded by both models to fit on (default 5000; 'all' = the whole split)",
    )
    p.add_argument("--split", default="train", choices=["train", "test"], help="where the sample comes from")
    p.add_argument("--data", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="image-folder decoding processes (0: none)")
    p.add_argument("--hidden", type=int, default=256, help="hidden units of the mlp adapter")
    p.add_argument("--steps", type=int, default=3000, help="training steps of the mlp adapter")
    p.add_argument(
        "--eval-limit", type=int, default=None, help="evaluate the card's metrics on N test images"
    )
    p.add_argument("--threads", type=int, default=None)
    return p


def transform_parser(prog: str = "graceful transform") -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog,
        description="Fit a transform from an old model's embedding space into a new one's, saved in the new "
        "model's folder (transforms/<old version>), so a gallery's stored old vectors can be upgraded "
        "without re-reading its images.",
    )
    p.add_argument(
        "--old", required=True, help="the old model version folder (whose vectors the gallery holds)"
    )
    p.add_argument("--new", required=True, help="the new model version folder (the transform is saved in it)")
    p.add_argument("--data", default=None, help="dataset or image folder the sample comes from")
    p.add_argument("--split", default="train", choices=["train", "test"], help="where the sample comes from")
    p.add_argument(
        "--sample",
        type=_sample_size,
        default=20000,
        help="images embedded by both models to fit on (default 20000; 'all' = the whole split)",
    )
    p.add_argument("--kind", default="mlp", choices=["procrustes", "affine", "mlp"])
    p.add_argument("--hidden", type=int, default=512, help="hidden units of the mlp transform")
    p.add_argument("--steps", type=int, default=3000, help="training steps of the mlp transform")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="image-folder decoding processes (0: none)")
    p.add_argument(
        "--eval",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="evaluate retrieval on the data's test split (default: on)",
    )
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on a seeded slice of N test images")
    return p


def _progress_bar(desc: str, quiet: bool):
    """A step callback drawing a tqdm bar, created on the first step so early errors print alone."""
    if quiet:
        return None, lambda: None
    from tqdm import tqdm

    bar: list[tqdm] = []

    def update(step: int, total: int, terms: dict[str, float]) -> None:
        if not bar:
            bar.append(tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True))
        bar[0].update(step - bar[0].n)
        if step % 10 == 0 or step == total:
            bar[0].set_postfix({k: f"{v:.3f}" for k, v in terms.items()}, refresh=False)

    return update, lambda: bar and bar[0].close()


def train_main(argv: Sequence[str] | None = None) -> int:
    """`graceful train`; under torchrun (trainer.distributed) every process runs it, rank 0 alone prints."""
    from trainer.distributed import is_main_process
    from trainer.train import TrainConfig, train

    try:
        args = train_parser().parse_args(argv)
        cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k != "quiet"})
        if cfg.old and not Path(cfg.old).is_dir():
            return _fail(f"old model folder {cfg.old} does not exist")
        if cfg.old and not (cfg.bct or cfg.pc or cfg.lqf):
            return _fail(
                "--old is only used with --bct, --pc or --lqf (to train independently, leave --old out)"
            )
        if cfg.lqf and not cfg.old:
            return _fail("--lqf needs --old DIR (the model to fine-tune linearly)")
        if cfg.pc and not cfg.old:
            return _fail("--pc needs --old DIR (the model whose right answers to keep)")
        if cfg.unlabeled and not cfg.bct:
            return _fail("--unlabeled is a BCT term: it needs --old DIR and --bct")
        if cfg.unlabeled and not Path(cfg.unlabeled).is_dir():
            return _fail(f"unlabeled image folder {cfg.unlabeled} does not exist")
        if cfg.classes is not None:
            from trainer.data import parse_classes

            parse_classes(cfg.classes)
        main_rank = is_main_process()
        update, close = _progress_bar(f"train {Path(cfg.out).name}", args.quiet or not main_rank)
        try:
            result = train(cfg, progress=update)
        finally:
            close()
    except TrainerError as e:
        return _fail(str(e))
    card = result.card
    if not main_rank:
        return 0
    print(
        f"saved {card.version} to {result.path} (space {card.space}, compatible_with {card.compatible_with}, "
        f"{result.seconds:.0f}s)"
    )
    for key, cell in card.metrics.get("matrix", {}).items():
        print(f"  {key:<24} top1 {cell['top1']:.4f}  top5 {cell['top5']:.4f}  mAP {cell['mAP']:.4f}")
    return 0


def eval_main(argv: Sequence[str] | None = None) -> int:
    from trainer.artifact import load_model
    from trainer.data import load_split, parse_classes
    from trainer.evaluate import evaluate_models, format_flips, format_matrix

    try:
        args = eval_parser().parse_args(argv)
        models = [load_model(p) for p in args.models]
        test = load_split(args.data, "test")
        if args.limit:
            test = test.take(args.limit, seed=0)
        old_classes = parse_classes(args.old_classes, test.num_classes) if args.old_classes else None
        report = evaluate_models(models, test, old_classes)
    except TrainerError as e:
        return _fail(str(e))
    except ValueError as e:
        return _fail(str(e))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report.to_json(), indent=1) + "\n")
    for metric in ("top1", "top5", "mAP"):
        print(format_matrix(report, metric))
        print()
    for key, entry in report.bct.items():
        gain = entry.get("update_gain", {})
        print(
            f"BCT {key}: passes {entry['passes']}, update gain "
            + ", ".join(f"{m} {v:.3f}" for m, v in gain.items() if v is not None)
        )
    for key, f in report.flips.items():
        print(
            f"flips {key}: err {f['err_old']:.4f} -> {f['err_new']:.4f}, NFR {f['nfr']:.4f}, "
            f"rel. NFR {f['rel_nfr']:.3f} ({f['n_flips']} of {f['n']})"
        )
        print(format_flips(f, test.class_names, args.show_flips))
    for key, pair in report.retrieval_flips.items():
        for r in pair.values():
            print(
                f"retrieval flips {key}, {r['new_setting']} against {r['old_setting']}: top-1 "
                f"{r['top1_old']:.4f} -> {r['top1_new']:.4f}, NFR {r['nfr']:.4f} ({r['n_negative']} of "
                f"{r['n']} queries), PFR {r['pfr']:.4f} ({r['n_positive']})"
            )
    print(f"report written to {args.json}")
    if args.plot:
        from trainer.plot import plot_matrix

        print(f"heatmap written to {plot_matrix(report, args.plot)}")
    return 0


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def adapt_main(argv: Sequence[str] | None = None) -> int:
    from trainer.adapt import AdaptConfig, adapt

    try:
        args = adapt_parser().parse_args(argv)
        for flag in ("new", "old"):
            if not Path(getattr(args, flag)).is_dir():
                return _fail(f"--{flag} model folder {getattr(args, flag)} does not exist")
        result = adapt(AdaptConfig(**vars(args)))
    except TrainerError as e:
        return _fail(str(e))
    card = result.card
    fit = result.fit
    print(
        f"saved adapter {card.version} to {result.path}: {card.adapter_of} -> space {card.space} "
        f"({card.train_config['kind']}, {card.train_config['sample_size']} pairs, fit {result.seconds:.1f}s, "
        f"sample cosine {fit['sample_cos']:.4f})"
    )
    for key, cell in card.metrics.get("matrix", {}).items():
        print(f"  {key:<24} top1 {cell['top1']:.4f}  top5 {cell['top5']:.4f}  mAP {cell['mAP']:.4f}")
    return 0


def transform_main(argv: Sequence[str] | None = None) -> int:
    from trainer.artifact import load_model
    from trainer.transform import TransformConfig, evaluate_transform, fit_transform, load_transform

    try:
        args = transform_parser().parse_args(argv)
        for flag in ("old", "new"):
            if not Path(getattr(args, flag)).is_dir():
                return _fail(f"--{flag} model folder {getattr(args, flag)} does not exist")
        cfg = TransformConfig(**{k: v for k, v in vars(args).items() if k not in ("eval", "eval_limit")})
        result = fit_transform(cfg)
        card = result.card
        fit = card.fit
        held = f", held-out cosine {fit['holdout_cos']:.4f}" if "holdout_cos" in fit else ""
        print(
            f"saved transform {card.source} -> {card.target} to {result.path} ({card.kind}, "
            f"{card.in_dim} -> {card.out_dim} dims, {card.sample_size} pairs, fit {card.seconds:.1f}s, "
            f"sample cosine {fit['sample_cos']:.4f}{held})"
        )
        if not args.eval:
            return 0
        report = evaluate_transform(
            load_transform(result.path),
            load_model(args.old),
            load_model(args.new),
            args.data,
            args.eval_limit,
            args.workers,
        )
    except TrainerError as e:
        return _fail(str(e))
    print("retrieval on the test split (query/gallery):")
    for key in ("new/old", "new/transformed-old", "new/new", "old/old"):
        cell = report[key]
        if cell is None:
            print(f"  {key:<22} (sizes differ: no raw comparison)")
        else:
            print(f"  {key:<22} top1 {cell['top1']:.4f}  top5 {cell['top5']:.4f}  mAP {cell['mAP']:.4f}")
    gain = report["update_gain"] or {}
    print("  update gain of new/transformed-old: " + ", ".join(f"{m} {v:.3f}" for m, v in gain.items()))
    return 0


def _alpha(v: str) -> float:
    try:
        a = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {v!r}") from None
    if not 0.0 <= a <= 1.0:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be in [0, 1] (the old model's share of the weights), got {v}")
    return a


def interpolate_parser(prog: str = "graceful interpolate") -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog,
        description="Backward-compatible weight interpolation (BCWI, no training): write a model version whose "
        "weights are (1 - alpha) * new + alpha * old, for two models of one architecture, classes and input "
        "contract (BatchNorm running statistics mixed too, counters from the new model).",
    )
    p.add_argument("--old", required=True, help="the old model version folder")
    p.add_argument(
        "--new", required=True, help="the new model version folder (same architecture and classes)"
    )
    p.add_argument(
        "--alpha",
        type=_alpha,
        required=True,
        help="the old model's share in [0, 1]: 0 gives the new model, 1 the old one",
    )
    p.add_argument("--out", required=True, help="model version folder to write (its name is the version)")
    p.add_argument("--data", default=None, help="dataset whose test split the card's metrics come from")
    p.add_argument(
        "--eval",
        dest="evaluate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure old, new and the interpolation on the test split into the card (default: on)",
    )
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on a seeded slice of N test images")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="image-folder decoding processes (0: none)")
    return p


def interpolate_main(argv: Sequence[str] | None = None) -> int:
    from trainer.interpolate import InterpolateConfig, interpolate

    try:
        args = interpolate_parser().parse_args(argv)
        for flag in ("old", "new"):
            if not Path(getattr(args, flag)).is_dir():
                return _fail(f"--{flag} model folder {getattr(args, flag)} does not exist")
        result = interpolate(InterpolateConfig(**vars(args)))
    except TrainerError as e:
        return _fail(str(e))
    card, tc = result.card, result.card.train_config
    print(
        f"saved {card.version} to {result.path}: (1 - {tc['alpha']:g}) * {tc['new_version']} + "
        f"{tc['alpha']:g} * {tc['old_version']} (space {card.space}, {result.seconds:.1f}s)"
    )
    for key, cell in card.metrics.get("matrix", {}).items():
        print(f"  {key:<24} top1 {cell['top1']:.4f}  top5 {cell['top5']:.4f}  mAP {cell['mAP']:.4f}")
    for key, f in card.metrics.get("flips", {}).items():
        print(f"  flips {key}: err {f['err_old']:.4f} -> {f['err_new']:.4f}, NFR {f['nfr']:.4f}")
    return 0


def register_onnx_parser(prog: str = "graceful register-onnx") -> argparse.ArgumentParser:
    from trainer.preprocess import INTERPOLATIONS, RESIZE_POLICIES

    p = _Parser(
        prog=prog,
        description="Register an ONNX export as a model version folder (card + the file, checksummed); "
        "the graph is checked and test-run, and a classifier head fitted on the training images.",
    )
    p.add_argument("model", help="the .onnx file: one image input (N, C, H, W), outputs (N, D) [and (N, K)]")
    p.add_argument("--out", required=True, help="model version folder to write (its name is the version)")
    p.add_argument("--size", type=int, nargs="+", required=True, metavar="PX", help="input height [width]")
    p.add_argument("--channels", type=int, required=True, choices=[1, 3])
    p.add_argument("--mean", type=float, nargs="+", required=True, help="per-channel mean of [0, 1] pixels")
    p.add_argument("--std", type=float, nargs="+", required=True, help="per-channel std of [0, 1] pixels")
    p.add_argument(
        "--classes",
        default=None,
        help="the classes the export knows, in its logits' order, e.g. 0-4 (default: all, or 0..K-1)",
    )
    p.add_argument("--data", default=None, help="dataset whose training images fit the head")
    p.add_argument("--resize", default="fit", choices=list(RESIZE_POLICIES))
    p.add_argument("--interpolation", default="bilinear", choices=list(INTERPOLATIONS))
    p.add_argument(
        "--scale", type=float, default=4.0, help="cosine scale of a class-mean head (no logits output)"
    )
    p.add_argument(
        "--sample", type=int, default=None, help="fit the head on a seeded slice of N training images"
    )
    p.add_argument(
        "--max-mib", type=float, default=512, help="refuse ONNX files larger than this (MiB, default 512)"
    )
    p.add_argument("--threads", type=int, default=None)
    return p


def register_onnx_main(argv: Sequence[str] | None = None) -> int:
    from trainer.register_onnx import RegisterConfig, register_onnx

    try:
        args = register_onnx_parser().parse_args(argv)
        if not Path(args.model).is_file():
            return _fail(f"ONNX file {args.model} does not exist")
        cfg = RegisterConfig(
            **{k: v for k, v in vars(args).items() if k != "max_mib"}, max_bytes=int(args.max_mib * 2**20)
        )
        result = register_onnx(cfg)
    except TrainerError as e:
        return _fail(str(e))
    card, head = result.card, result.card.metrics.get("head", {})
    print(
        f"registered {card.version} at {result.path}: ONNX {card.embedding_dim}-d embeddings, "
        f"{len(card.classes)} classes, head by {head.get('method')} on {head.get('sample')} images "
        f"({result.seconds:.1f}s)"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m trainer.cli train|eval|adapt|transform|interpolate|register-onnx ...``: the trainer's commands of `graceful`
    without the service's console, e.g. for ``torchrun --nproc-per-node N -m trainer.cli train ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "train": train_main,
        "eval": eval_main,
        "adapt": adapt_main,
        "transform": transform_main,
        "interpolate": interpolate_main,
        "register-onnx": register_onnx_main,
    }
    if not argv or argv[0] not in commands:
        return _fail(f"python -m trainer.cli takes one of {', '.join(commands)} (got {argv[:1]})")
    rest = argv[1:]
    setup_logging("-v" in rest or "--verbose" in rest)
    return commands[argv[0]]([a for a in rest if a not in ("-v", "--verbose")])


if __name__ == "__main__":
    sys.exit(main())
