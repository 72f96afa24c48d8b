"""The training loop: task loss, optionally BCT and/or PC (focal distillation) against an old model; saves a
model version folder. Under torchrun it trains with DDP, one share of each global batch per process
(trainer.distributed)."""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from trainer import distributed, lqf
from trainer.artifact import (
    LoadedModel,
    ModelCard,
    check_version_name,
    load_model,
    read_card,
    save_model,
    write_card,
)
from trainer.data import Dataset, ImageFolder, Split, augment_views, iter_views, load_split, parse_classes
from trainer.distributed import Dist, check_shards, global_view, local_rows, shard_batches, sync_batchnorm
from trainer.errors import ConfigError, IncompatibleModelsError
from trainer.losses import (
    PC_KINDS,
    BCTWeights,
    FocalDistillation,
    bct_losses,
    build_old_head,
    class_means,
    embed_rows,
    focal_distillation,
    probe_new_rows,
    shared_class_rows,
    task_loss,
)
from trainer.lqf import LQFSettings
from trainer.model import ArchConfig, EmbeddingModel, build_model
from trainer.preprocess import LEGACY_MEAN, LEGACY_STD, Preprocess
from trainer.unlabeled import UnlabeledPull, load_unlabeled, unlabeled_loss, unlabeled_targets
from trainer.warm_start import warm_start

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything that determines a training run; stored in the card as ``train_config``."""

    out: str
    data: str | None = None
    classes: str | None = None  # e.g. "0-4"; None = every class of the dataset
    arch: str = "resnet"  # a preset, or a library backbone "timm:NAME" (trainer.backbones)
    backbone_weights: str | None = None  # a library backbone's initial weights (.safetensors)
    width: int | None = None
    depth: int | None = None
    embedding_dim: int = 128
    scale: float = 4.0  # see ArchConfig.scale
    epochs: int = 8
    batch_size: int = 256
    lr: float = 0.1
    weight_decay: float = 5e-4
    seed: int = 0
    old: str | None = None
    bct: str | None = None  # None, "full" or "plain"
    influence_weight: float | None = None
    class_mean_weight: float | None = None
    old_embedding_weight: float | None = None
    pulls_on: str | None = None
    influence_scale: float | None = None
    new_rows: str | None = None
    pc: str | None = None  # None, "kd", "fd-kl" or "fd-lm": distil the old model's logits (PC training)
    pc_alpha: float | None = None  # None = the preset's (FocalDistillation.preset)
    pc_beta: float | None = None
    pc_temperature: float | None = None
    pc_weight: float | None = None
    # Run the old model once over the un-augmented training set and look its outputs up per step (PC's logits,
    # and the old embeddings BCT's pull uses) instead of running it on every batch. With augmentation on, the
    # cached teacher has seen the clean image, not the flipped or shifted view the new model sees, and that is
    # another target: Fashion-MNIST's v1 changes its answer on 7.5% of the views, and a PC term with a cached
    # teacher did not cut flips at all (BENCHMARKS.md, "Positive-congruent training"). Meant for --no-augment;
    # train() warns otherwise.
    cache_old_logits: bool = False
    # Unlabeled images for BCT (trainer.unlabeled): a dataset folder or any folder of images, e.g. a gallery
    # export; the new model's embedding of each is pulled towards a target in the old space.
    unlabeled: str | None = None
    unlabeled_limit: int | None = None  # a seeded sample of at most this many
    unlabeled_weight: float | None = None  # None = UnlabeledPull's defaults
    unlabeled_target: str | None = None
    unlabeled_k: int | None = None
    # Start from the old model's weights (trainer.warm_start): with --bct a warm-started BCT child, alone plain
    # (nonlinear) fine-tuning of the old model, the baseline LQF and weight interpolation are read against.
    init_from_old: bool = False
    limit: int | None = None  # train on a seeded slice of this many images (tests, quick runs)
    eval_limit: int | None = None  # evaluate the card's metrics on a slice of the test split
    threads: int | None = None
    augment: bool = True
    # The new model's input contract (card ``preprocess``; see _contract). None: IDX data's own shape, or
    # 64x64 RGB for image folders; size "N" or "HxW".
    size: str | None = None
    channels: int | None = None
    resize: str | None = None  # None = "fit"
    mean: list[float] | None = None  # None: the usual values for the channels (_contract)
    std: list[float] | None = None
    workers: int | None = None  # image-folder decoding processes; None = trainer.data.default_workers()
    device: str = "cpu"
    stem_stride: int | None = None  # None = the preset's; 2 halves larger inputs in the stem's conv
    # Leaky ReLU slope of the presets (ArchConfig.negative_slope); None = ReLU, or with --lqf the old model's.
    negative_slope: float | None = None
    # LQF (trainer.lqf): fine-tune --old linearised around its weights, least squares, K-FAC preconditioned.
    lqf: bool = False
    lqf_target: float | None = None  # least-squares targets target * onehot; None = the head's scale
    lqf_damping: float | None = None  # K-FAC's relative damping; None = LQFSettings' default

    def bct_weights(self) -> BCTWeights:
        base = BCTWeights.recipe(self.bct or "full")
        return BCTWeights(
            influence=base.influence if self.influence_weight is None else self.influence_weight,
            to_class_mean=base.to_class_mean if self.class_mean_weight is None else self.class_mean_weight,
            to_old_embedding=base.to_old_embedding
            if self.old_embedding_weight is None
            else self.old_embedding_weight,
            pulls_on=base.pulls_on if self.pulls_on is None else self.pulls_on,
            influence_scale=base.influence_scale if self.influence_scale is None else self.influence_scale,
            new_rows=base.new_rows if self.new_rows is None else self.new_rows,
        )

    def unlabeled_pull(self) -> UnlabeledPull | None:
        if self.unlabeled is None:
            return None
        given = {"weight": self.unlabeled_weight, "target": self.unlabeled_target, "k": self.unlabeled_k}
        return UnlabeledPull(**{k: v for k, v in given.items() if v is not None})  # type: ignore[arg-type]

    def lqf_settings(self, old: ArchConfig) -> LQFSettings:
        """The run's LQF settings: the slope defaults to the old model's, the target to its head's scale."""
        return LQFSettings(
            negative_slope=old.negative_slope if self.negative_slope is None else self.negative_slope,
            target=old.scale if self.lqf_target is None else self.lqf_target,
            damping=LQFSettings.damping if self.lqf_damping is None else self.lqf_damping,
            weight_decay=self.weight_decay,
        )

    def pc_loss(self) -> FocalDistillation | None:
        if self.pc is None:
            return None
        return FocalDistillation.preset(
            self.pc,
            alpha=self.pc_alpha,
            beta=self.pc_beta,
            temperature=self.pc_temperature,
            weight=self.pc_weight,
        )


@dataclass
class TrainResult:
    card: ModelCard
    path: Path
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _batches(
    ds: Split, preps: list[Preprocess], batch_size: int, gen: torch.Generator | None, workers: int | None
) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    """(uint8 images (B, C, H, W) under each contract, labels (B,)) in a seeded shuffled order (or in order
    if gen is None): each model sees every image through its own contract (trainer.data.iter_views)."""
    order = torch.randperm(len(ds), generator=gen) if gen is not None else torch.arange(len(ds))
    yield from iter_views(ds, preps, batch_size, order, workers)


# The usual per-channel statistics: Fashion-MNIST's for one channel (the contract of every model before
# contracts had more fields, so IDX training keeps its cards), ImageNet's for RGB (what the backbones of
# model libraries are trained with; measured statistics of a training sample would tie the card to it).
RGB_MEAN, RGB_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FOLDER_SIZE, FOLDER_CHANNELS = 64, 3


def parse_size(size: str | int | None) -> tuple[int, int] | None:
    """``"64"`` or ``"64x48"`` (height x width) -> (height, width)."""
    if size is None:
        return None
    parts = str(size).lower().split("x")
    try:
        h, w = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, 0)
    except ValueError:
        h = w = 0
    if h < 1 or w < 1:
        raise ConfigError(f"--size takes N or HxW (e.g. 64 or 64x48), got {size!r}")
    return h, w


def _contract(cfg: TrainConfig, train_set: Split) -> Preprocess:
    """The new model's input contract: IDX data keeps its own shape unless told; folders default to
    64x64 RGB; mean/std default to the usual values for the channels (RGB_MEAN above)."""
    size = parse_size(cfg.size)
    if isinstance(train_set, Dataset):
        c, h, w = train_set.images.shape[1:]
    else:
        c, h, w = FOLDER_CHANNELS, FOLDER_SIZE, FOLDER_SIZE
    channels = cfg.channels or c
    height, width = size or (h, w)
    mean = cfg.mean or ((LEGACY_MEAN,) if channels == 1 else RGB_MEAN)
    std = cfg.std or ((LEGACY_STD,) if channels == 1 else RGB_STD)
    return Preprocess(
        channels=channels, height=height, width=width, resize=cfg.resize or "fit", mean=mean, std=std
    )


def _to_device(
    dev: torch.device, model: torch.nn.Module, old: LoadedModel | None, old_head: torch.nn.Module | None
) -> torch.device:
    """Move the new model, the BCT head and a torch old model to ``dev``; returns the device the old model
    takes its inputs on (an old model that is no torch module stays where it runs)."""
    model.to(dev)
    torch_old = old is not None and isinstance(old.model, torch.nn.Module)
    if old_head is not None:
        if old is not None and not torch_old and dev.type != "cpu" and old_head.old is old.model.head:
            old_head.old = copy.deepcopy(old_head.old)  # the old model's own head stays where it runs
        old_head.to(dev)
    if old is not None and torch_old:
        old.model.to(dev)
        return dev
    return torch.device("cpu")


def _device(name: str) -> torch.device:
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"--device takes cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {name} asked, but torch {torch.__version__} sees no CUDA device (a CPU build, or no "
            "GPU/driver on this machine): train with --device cpu"
        )
    return torch.device(name)


def _shift_pad(prep: Preprocess) -> int:
    """The augmentation's largest shift in pixels for inputs under ``prep``: 2 px at 28x28, scaled."""
    return max(2, round(2 * min(prep.height, prep.width) / 28))


Step = tuple[tuple[torch.Tensor, ...], torch.Tensor, float, torch.Tensor]


def _steps(
    ds: Split,
    preps: list[Preprocess],
    batch_size: int,
    gen: torch.Generator,
    workers: int | None,
    pad: int | None,
    ctx: Dist,
) -> Iterator[Step]:
    """One seeded pass over ``ds``, a step per global batch of ``batch_size``: (this process's views, (m, C, H, W)
    uint8 per contract, augmented alike when ``pad`` is given; their (m,) labels; the weight on its per-sample
    means; their (m,) int64 indices in ``ds``, e.g. to look up per-image outputs cached once). A plain run
    takes the whole batch, weight 1. Under DDP every rank draws the same permutation and the same
    augmentation *of the whole global batch* from ``gen`` (a zero-filled global batch around its share: the
    flips and the shift are drawn per global batch), so each image gets exactly the order and
    the augmentation of single-process training; the weight is m * world / global batch
    (trainer.distributed.Share.weight)."""
    if not ctx.active:
        order = torch.randperm(len(ds), generator=gen)  # what _batches draws, kept for the indices
        for i, (views, labels) in enumerate(iter_views(ds, preps, batch_size, order, workers)):
            idx = order[i * batch_size : i * batch_size + len(labels)]
            yield (augment_views(views, gen, pad) if pad is not None else views), labels, 1.0, idx
        return
    order = torch.randperm(len(ds), generator=gen)
    local, shares = shard_batches(order, batch_size, ctx.rank, ctx.world_size)
    batches = iter_views(_rows_of(ds, local.numpy()), preps, batch_size // ctx.world_size, None, workers)
    start = 0
    for (views, labels), share in zip(batches, shares, strict=True):
        idx = local[start : start + len(labels)][share.valid]  # this share's rows of ``ds``, padding left out
        start += len(labels)
        # A view object repeated in ``views`` (a contract shared by two models) stays one object.
        made: dict[int, torch.Tensor] = {}
        if pad is not None:
            full = {id(v): global_view(v, share) for v in views}
            aug = augment_views(tuple(full[id(v)] for v in views), gen, pad)
            for a in aug:
                made[id(a)] = made[id(a)] if id(a) in made else local_rows(a, share)
            mine = tuple(made[id(a)] for a in aug)
        else:
            for v in views:
                made[id(v)] = made[id(v)] if id(v) in made else v[share.valid]
            mine = tuple(made[id(v)] for v in views)
        yield mine, labels[share.valid], share.weight(ctx.world_size), idx


def _rows_of(ds: Split, idx: np.ndarray) -> Split:
    """Rows ``idx`` (M,) of ``ds``, in that order, as a split of their own (iter_views walks a whole split;
    an in-memory one is copied: this rank's share of an epoch)."""
    if isinstance(ds, Dataset):
        return Dataset(ds.images[idx], ds.labels[idx], ds.class_names)
    return ImageFolder(ds.root, ds.files[idx], ds.labels[idx], ds.class_names)


def _cycle(
    ds: Split, preps: list[Preprocess], batch_size: int, seed: int, workers: int | None, ctx: Dist
) -> Iterator[Step]:
    """Endless augmented batches of an unlabeled set, as ``_steps`` gives them ((m,) rows for labels), a new
    seeded order on every pass, on its own generator (the labelled stream draws as without it)."""
    gen = torch.Generator().manual_seed(seed + 7919)
    pad = _shift_pad(preps[0])
    while True:
        yield from _steps(ds, preps, batch_size, gen, workers, pad, ctx)


class _Forward(torch.nn.Module):
    """A step's forward passes of the new model as one module call, so DDP wraps them together: the labelled
    batch (B, C, H, W) -> (B, D), (B, K), and an unlabeled batch (U, C, H, W) -> (U, D) when given."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, x: torch.Tensor, ux: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        emb, logits = self.model(x)
        return emb, logits, (self.model.embed(ux) if ux is not None else None)


def _check_old(cfg: TrainConfig, old: LoadedModel | None) -> None:
    if cfg.bct and old is None:
        raise ConfigError("--bct needs --old DIR (the model whose embedding space to stay compatible with)")
    if cfg.pc and old is None:
        raise ConfigError("--pc needs --old DIR (the model whose right answers to keep)")
    if cfg.cache_old_logits and not cfg.pc:
        raise ConfigError(
            "--cache-old-logits caches the old model's logits for --pc: it needs --old DIR and --pc"
        )
    if cfg.unlabeled and not cfg.bct:
        raise ConfigError("--unlabeled is a BCT term: it needs --old DIR and --bct")
    if cfg.init_from_old and old is None:
        raise ConfigError("--init-from-old needs --old DIR (the model whose weights to start from)")
    if cfg.lqf:
        if old is None:
            raise ConfigError("--lqf needs --old DIR (the model to fine-tune linearly)")
        if cfg.bct or cfg.pc or cfg.unlabeled or cfg.init_from_old:
            raise ConfigError(
                "--lqf is its own update (the old network linearised, a least-squares loss): it does not "
                "combine with --bct, --pc, --unlabeled or --init-from-old"
            )
        lqf.check_old(old)
    if old is not None and old.card.adapter_of is not None:
        raise ConfigError(
            f"--old {old.version} is an adapter version: train against the model it adapts to "
            f"(its compatible_with, {old.card.compatible_with})"
        )
    # PC alone distils logits, so only BCT needs equal embedding sizes.
    if cfg.bct and old is not None and old.card.embedding_dim != cfg.embedding_dim:
        raise IncompatibleModelsError(
            f"embedding size mismatch: old model {old.version} writes {old.card.embedding_dim}-d embeddings, "
            f"the new model {cfg.embedding_dim}-d; BCT needs the same size (pass --embedding-dim {old.card.embedding_dim})"
        )


def train(
    cfg: TrainConfig, progress: Callable[[int, int, dict[str, float]], None] | None = None
) -> TrainResult:
    """Train one model version and save it to ``cfg.out``.

    ``progress(step, total_steps, terms)`` is called after every step (the CLI draws a bar with it).

    Under torchrun (``WORLD_SIZE`` > 1, trainer.distributed) each process trains its share of every global
    batch of ``cfg.batch_size`` with DDP; only rank 0 reports progress, writes ``cfg.out`` and evaluates, the
    others wait for it and return the card it wrote. The card's ``train_config.world_size`` says how many.
    """
    with distributed.session(cfg.device) as ctx:
        return _train(cfg, progress, ctx)


def _train(
    cfg: TrainConfig, progress: Callable[[int, int, dict[str, float]], None] | None, ctx: Dist
) -> TrainResult:
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise ConfigError("epochs and batch size must be >= 1 and lr > 0")
    if cfg.bct not in (None, "full", "plain"):
        raise ConfigError(f"unknown BCT recipe {cfg.bct!r}: 'full' or 'plain'")
    if cfg.pc not in (None, *PC_KINDS):
        raise ConfigError(f"unknown PC loss {cfg.pc!r}: choose one of {', '.join(PC_KINDS)}")
    pc = cfg.pc_loss()
    weights = cfg.bct_weights()
    pull = cfg.unlabeled_pull()
    out = Path(cfg.out)
    version = check_version_name(out.name)
    dev = _device(distributed.device_for(cfg.device, ctx.local_rank) if ctx.active else cfg.device)
    parse_size(cfg.size)
    if cfg.workers is not None and cfg.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {cfg.workers}")
    if cfg.threads:  # before loading the old model: an ONNX one takes torch's thread count
        torch.set_num_threads(cfg.threads)
    old = load_model(cfg.old) if cfg.old else None  # an ONNX folder too: embedded by onnxruntime
    _check_old(cfg, old)
    gen = seed_everything(cfg.seed)

    full_train = load_split(cfg.data, "train")
    classes = parse_classes(cfg.classes, full_train.num_classes)
    train_set = full_train.subset(classes)
    if cfg.limit:
        train_set = train_set.take(cfg.limit, seed=cfg.seed)
    if ctx.active:
        check_shards(len(train_set), cfg.batch_size, ctx.world_size)
    prep = _contract(cfg, train_set)
    model = build_model(
        cfg.arch,
        classes,
        width=cfg.width,
        depth=cfg.depth,
        embedding_dim=cfg.embedding_dim,
        scale=cfg.scale,
        in_channels=prep.channels,
        stem_stride=cfg.stem_stride,
        negative_slope=cfg.negative_slope,
        backbone_weights=cfg.backbone_weights,
        input_size=(prep.height, prep.width),
    )
    if cfg.lqf:  # the old network linearised: its own loop and card (trainer.lqf)
        assert old is not None
        return _train_lqf(cfg, model, old, train_set, full_train.class_names, prep, gen, progress, ctx)

    old_head = centres = None
    if cfg.bct and old is not None:
        old_prep = old.preprocess
        # Old-model class means over the *new* training set: synthesised rows for unseen classes, and centres.
        # Each image through the old model's own contract; on the CPU (the old model moves to --device after).
        old_emb_rows = embed_rows(
            old.model,
            ((old_prep(x), y) for (x,), y in _batches(train_set, [old_prep], 1024, None, cfg.workers)),
            classes,
            old.card.embedding_dim,
        )
        centres = class_means(*old_emb_rows, classes)
        old_head = build_old_head(old.model, classes, centres)
        if weights.new_rows != "mean":
            # The same embeddings refine the new classes' rows against the head they are appended to.
            means, new = centres, old_head.old_index < 0
            centres = probe_new_rows(
                *old_emb_rows, means, new, weights.new_rows, old_head.weight().detach(), old_head.scale
            )
            log.info(
                "new-class rows by %s: cosine to the class mean %s",
                weights.new_rows,
                [round(float(v), 2) for v in torch.nn.functional.cosine_similarity(centres, means)[new]],
            )
            old_head = build_old_head(old.model, classes, centres)
        log.info(
            "BCT against %s: %d old rows, %d synthesised rows",
            old.version,
            int((old_head.old_index >= 0).sum()),
            old_head.synthesized.shape[0],
        )

    if cfg.init_from_old and old is not None:
        warm_start(model, prep, old, old_head.weight() if old_head is not None else None)
        log.info("started from %s's weights", old.version)

    unl_targets = unl_batches = None
    if pull is not None and old is not None and cfg.unlabeled:
        unl_set = load_unlabeled(cfg.unlabeled, cfg.unlabeled_limit, cfg.seed)
        if ctx.active:
            check_shards(len(unl_set), pull.batch, ctx.world_size, "unlabeled images")
        if pull.target != "old":
            unl_targets = unlabeled_targets(old.model, old.preprocess, unl_set, pull, cfg.workers)
        # "old": the old model embeds the same augmented view each step (exact distillation); other
        # targets are fixed per image, computed once from the clean image.
        unl_preps = [prep, old.preprocess] if pull.target == "old" else [prep]
        unl_batches = _cycle(unl_set, unl_preps, pull.batch, cfg.seed, cfg.workers, ctx)
        log.info(
            "unlabeled pull: %d images from %s, target %s, weight %g",
            len(unl_set),
            cfg.unlabeled,
            pull.target,
            pull.weight,
        )

    pc_rows = None
    if pc is not None and old is not None:
        pc_rows = shared_class_rows(old.model.classes, classes)
        log.info(
            "PC %s against %s over %d shared classes (alpha %g, beta %g, T %g, weight %g)",
            pc.kind,
            old.version,
            len(pc_rows[0]),
            pc.alpha,
            pc.beta,
            pc.temperature,
            pc.weight,
        )

    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, min(steps_per_epoch, total // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
        ),
    )

    # The old model sees each image through its own contract: a second view of the same decoded image.
    needs_old = pc_rows is not None or (old_head is not None and bool(weights.to_old_embedding))
    cache_old = cfg.cache_old_logits and needs_old and old is not None
    # A cached teacher needs no view of its own: its outputs are looked up by the batch's dataset indices.
    preps = [prep, old.preprocess] if needs_old and old is not None and not cache_old else [prep]
    pad = _shift_pad(prep)
    old_dev = _to_device(dev, model, old, old_head)
    old_cache = None
    if cache_old and cfg.augment:
        log.warning(
            "--cache-old-logits with augmentation: the cached teacher saw the clean images, not the augmented "
            "views the new model trains on, so its targets are not its answers on them (a PC term then barely "
            "cuts flips); pass --no-augment, or drop --cache-old-logits to run the teacher on every view"
        )
    if cache_old and old is not None:
        t_cache = time.perf_counter()
        old_cache = _old_outputs(old, train_set, old_dev, dev, cfg.workers)
        log.info(
            "cached %s's outputs on %d un-augmented training images in %.1fs",
            old.version,
            len(train_set),
            time.perf_counter() - t_cache,
        )
    if centres is not None:
        centres = centres.to(dev)
    if unl_targets is not None:
        unl_targets = unl_targets.to(dev)
    if pc_rows is not None:
        pc_rows = (pc_rows[0].to(dev), pc_rows[1].to(dev))

    # DDP over the new model only: the frozen old model and BCT's old head stay outside it, unwrapped. Its
    # BatchNorm layers compute training statistics over the global batch (trainer.distributed.sync_batchnorm:
    # what one process would compute), and their running statistics are the same on every rank.
    restore_bn = sync_batchnorm(model, ctx)
    forward = _Forward(model)
    net: torch.nn.Module = forward
    if ctx.active:
        net = torch.nn.parallel.DistributedDataParallel(
            forward, device_ids=[dev.index] if dev.type == "cuda" else None
        )

    history: list[dict[str, float]] = []
    step, t0 = 0, time.perf_counter()
    model.train()
    for epoch in range(cfg.epochs):
        sums: dict[str, float] = {}
        steps = _steps(train_set, preps, cfg.batch_size, gen, cfg.workers, pad if cfg.augment else None, ctx)
        for views, yb, w, idx in steps:
            x8, old8 = views[0], views[-1]
            yb = yb.to(dev)
            uviews = urows = None
            uw = 1.0
            if pull is not None and unl_batches is not None:
                uviews, urows, uw, _ = next(unl_batches)
            emb, logits, uemb = net(  # (B, D), (B, K), (U, D) or None
                prep(x8).to(dev), prep(uviews[0]).to(dev) if uviews is not None else None
            )
            rows = model.label_to_row(yb)
            terms = {"task": task_loss(logits, rows)}
            old_emb = old_logits = None
            if old_cache is not None:  # (B, D_old), (B, K_old), computed once on the clean images
                rows_dev = idx.to(dev)
                old_emb, old_logits = old_cache[0][rows_dev], old_cache[1][rows_dev]
            elif needs_old and old is not None:
                with torch.no_grad():  # (B, D_old), (B, K_old)
                    old_emb, old_logits = old.model(old.preprocess(old8).to(old_dev))
                    old_emb, old_logits = old_emb.to(dev), old_logits.to(dev)
            if old_head is not None:
                terms.update(bct_losses(emb, rows, old_head, weights, centres, old_emb))
            if pc is not None and pc_rows is not None and old is not None and old_logits is not None:
                terms.update(focal_distillation(logits, old_logits, old.model.label_to_row(yb), pc_rows, pc))
            uterms: dict[str, torch.Tensor] = {}
            if pull is not None and uviews is not None and uemb is not None and old is not None:
                if pull.target == "old":
                    with torch.no_grad():
                        target = old.model.embed(old.preprocess(uviews[-1]).to(old_dev)).to(dev)
                else:
                    assert unl_targets is not None and urows is not None
                    target = unl_targets[urows]
                uterms = unlabeled_loss(uemb, target, pull.weight)
            if ctx.active:
                # Every term is a mean over its batch: weighted by share, DDP's gradient average over the
                # ranks is the gradient of the global batch's mean (equal shares: weight 1).
                terms = {k: v * w for k, v in terms.items()}
                uterms = {k: v * uw for k, v in uterms.items()}
            terms.update(uterms)
            loss = sum(terms.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[union-attr]
            opt.step()
            sched.step()
            step += 1
            scalars = _global_terms(terms, ctx)
            for k, v in scalars.items():
                sums[k] = sums.get(k, 0.0) + v
            if progress and ctx.is_main:
                progress(step, total, scalars)
        history.append({"epoch": epoch + 1, **{k: v / steps_per_epoch for k, v in sums.items()}})
        log.info("epoch %d/%d %s", epoch + 1, cfg.epochs, history[-1])
    seconds = time.perf_counter() - t0
    restore_bn()
    model.eval()
    _to_device(torch.device("cpu"), model, old, old_head)

    card = ModelCard(
        version=version,
        arch=model.cfg.to_dict(),
        embedding_dim=model.cfg.embedding_dim,
        classes=classes,
        class_names=[full_train.class_names[c] for c in classes] if full_train.class_names else [],
        space=old.card.space if (cfg.bct and old is not None) else version,
        compatible_with=old.version if (cfg.bct and old is not None) else None,
        preprocess=prep.to_dict(),
        train_config={
            **asdict(cfg),
            **_resolved(cfg),
            "train_images": len(train_set),
            "world_size": ctx.world_size,  # processes that trained it (trainer.distributed); 1: a plain run
            "seconds": round(seconds, 1),
            "images_per_second": round(len(train_set) * cfg.epochs / seconds, 1),
        },
    )
    if ctx.is_main:  # one writer; the other ranks wait until the folder is complete and read its card
        card = save_model(out, model, card)
        card = _attach_metrics(out, card, old, cfg)
    ctx.barrier()
    if not ctx.is_main:
        card = read_card(out)
    return TrainResult(card=card, path=out, history=history, seconds=seconds)


def _old_outputs(
    old: LoadedModel, ds: Split, old_dev: torch.device, dev: torch.device, workers: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The old model's (N, D_old) embeddings and (N, K_old) logits of every image of ``ds`` in its stored order,
    un-augmented, through the old model's own contract; on ``dev``, to be indexed by dataset rows."""
    embs, logits = [], []
    with torch.no_grad():
        for (x,), _ in _batches(ds, [old.preprocess], 1024, None, workers):
            e, lg = old.model(old.preprocess(x).to(old_dev))
            embs.append(e.to(dev))
            logits.append(lg.to(dev))
    return torch.cat(embs), torch.cat(logits)


def _global_terms(terms: dict[str, torch.Tensor], ctx: Dist) -> dict[str, float]:
    """The step's loss terms as floats: under DDP the global batch's (the weighted shares summed over the
    ranks, divided by their number; one small all-reduce), so logs read as in single-process training."""
    if not ctx.active:
        return {k: float(v.detach()) for k, v in terms.items()}
    vec = ctx.sum_(torch.stack([v.detach() for v in terms.values()]))  # (T,)
    return {k: float(v) / ctx.world_size for k, v in zip(terms, vec, strict=True)}


def _train_lqf(
    cfg: TrainConfig,
    model: EmbeddingModel,
    old: LoadedModel,
    train_set: Split,
    class_names: list[str],
    prep: Preprocess,
    gen: torch.Generator,
    progress: Callable[[int, int, dict[str, float]], None] | None,
    ctx: Dist,
) -> TrainResult:
    """``graceful train --old DIR --lqf``: fine-tune the old model linearly on ``train_set`` (trainer.lqf) and
    save the weights ``w`` as an ordinary model folder at ``cfg.out`` (served as the nonlinear network at
    ``w``). ``model`` is the network the flags describe: the old one's, classes aside. The card's
    ``metrics.lqf`` holds ``lqf.evaluate_linearised`` (the linear model against the saved one)."""
    if ctx.active:
        raise ConfigError("--lqf trains in one process (not under torchrun)")
    if cfg.device != "cpu":
        raise ConfigError("--lqf trains on the CPU (--device cpu)")
    lqf.check_same_arch(old, model, prep)
    out = Path(cfg.out)
    version = check_version_name(out.name)
    assert isinstance(old.model, EmbeddingModel)
    settings = cfg.lqf_settings(old.model.cfg)
    classes = list(model.classes)
    pad = _shift_pad(prep) if cfg.augment else None

    def epoch_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for (x8,), yb in _batches(train_set, [prep], cfg.batch_size, gen, cfg.workers):
            if pad is not None:
                (x8,) = augment_views((x8,), gen, pad)
            yield prep(x8), model.label_to_row(yb)

    fit = lqf.fit_lqf(
        old,
        classes,
        settings,
        epoch_batches,
        cfg.epochs,
        math.ceil(len(train_set) / cfg.batch_size),
        cfg.lr,
        cfg.seed,
        progress,
    )
    final = fit.lin.nonlinear()
    card = ModelCard(
        version=version,
        arch=final.cfg.to_dict(),
        embedding_dim=final.cfg.embedding_dim,
        classes=classes,
        class_names=[class_names[c] for c in classes] if class_names else [],
        # A linear update makes no compatibility promise: its own space (the card's metrics measure it).
        space=version,
        compatible_with=None,
        preprocess=prep.to_dict(),
        train_config={
            **asdict(cfg),
            **_resolved(cfg),
            "lqf_settings": settings.to_dict(),
            "train_images": len(train_set),
            "world_size": 1,
            "seconds": round(fit.seconds, 1),
            "images_per_second": round(len(train_set) * cfg.epochs / max(fit.seconds, 1e-9), 1),
        },
    )
    card = save_model(out, final, card)
    test = _test_split(cfg)
    card = _attach_metrics(out, card, old, cfg, test)
    metrics = {**card.metrics, "lqf": lqf.evaluate_linearised(fit.lin, old, test, workers=cfg.workers)}
    card = card.model_copy(update={"metrics": metrics})
    write_card(out, card)  # the weights are unchanged: their checksum stands
    return TrainResult(card=card, path=out, history=fit.history, seconds=fit.seconds)


def _test_split(cfg: TrainConfig) -> Split:
    """The split the card's metrics are measured on: the test split, or a seeded slice of it."""
    test = load_split(cfg.data, "test")
    return test.take(cfg.eval_limit, seed=0) if cfg.eval_limit else test


def _attach_metrics(
    out: Path, card: ModelCard, old: LoadedModel | None, cfg: TrainConfig, test: Split | None = None
) -> ModelCard:
    """Evaluate the new model (and its compatibility with ``old``) on ``test`` (default: the test split) and
    store it in the card."""
    from trainer.evaluate import evaluate_models

    new = load_model(out)
    if test is None:
        test = _test_split(cfg)
    models = [old, new] if old is not None else [new]
    report = evaluate_models(models, test, workers=cfg.workers)
    card = card.model_copy(update={"metrics": report.card_metrics(new.version)})
    return save_model(out, new.model, card)


def _resolved(cfg: TrainConfig) -> dict[str, object]:
    """The BCT weights a run actually used: a recipe whose defaults change must not reuse older models."""
    from trainer.artifact import file_sha256

    return {
        "bct_weights": asdict(cfg.bct_weights()) if cfg.bct else None,
        "unlabeled_pull": asdict(pull) if (pull := cfg.unlabeled_pull()) else None,
        # the file a library backbone started from, by content (a path alone may be overwritten)
        **(
            {"backbone_weights_sha256": file_sha256(Path(cfg.backbone_weights))}
            if cfg.backbone_weights and Path(cfg.backbone_weights).is_file()
            else {}
        ),
    }


def reusable(cfg: TrainConfig) -> bool:
    """True when ``cfg.out`` holds a complete model trained with the same settings (threads, loader workers
    and device aside).

    A folder is complete once its card exists (written last), so an interrupted run is never reused.
    """
    from trainer.artifact import read_card
    from trainer.errors import ModelCardError

    skip = ("out", "threads", "workers", "device")  # where and how fast, not what is trained
    wanted = {k: v for k, v in {**asdict(cfg), **_resolved(cfg)}.items() if k not in skip}
    try:
        have = dict(read_card(cfg.out).train_config)
    except ModelCardError:
        return False
    if isinstance(have.get("bct_weights"), dict):
        # A field added to BCTWeights later is at its default in a card written before it existed.
        try:
            have["bct_weights"] = asdict(BCTWeights(**have["bct_weights"]))
        except (TypeError, ConfigError):
            return False
    # A field added to TrainConfig later is at its default in a card written before it existed.
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    return all(have.get(k, defaults.get(k)) == v for k, v in wanted.items())
