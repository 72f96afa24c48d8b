"""The training loop: task loss, optionally BCT and/or PC (focal distillation) against an old model; saves a
model version folder."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from trainer.artifact import LoadedModel, ModelCard, check_version_name, load_model, save_model
from trainer.data import Dataset, load_split, parse_classes
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
from trainer.model import build_model
from trainer.preprocess import Preprocess, augment

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything that determines a training run; stored in the card as ``train_config``."""

    out: str
    data: str | None = None
    classes: str | None = None  # e.g. "0-4"; None = every class of the dataset
    arch: str = "resnet"
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
    limit: int | None = None  # train on a seeded slice of this many images (tests, quick runs)
    eval_limit: int | None = None  # evaluate the card's metrics on a slice of the test split
    threads: int | None = None
    augment: bool = True

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
    ds: Dataset, batch_size: int, gen: torch.Generator | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images (B, C, H, W), labels (B,)) in a seeded shuffled order (or in order if gen is None)."""
    order = torch.randperm(len(ds), generator=gen) if gen is not None else torch.arange(len(ds))
    images, labels = torch.from_numpy(ds.images), torch.from_numpy(ds.labels)
    for i in range(0, len(ds), batch_size):
        idx = order[i : i + batch_size]
        yield images[idx], labels[idx]


def _check_old(cfg: TrainConfig, old: LoadedModel | None) -> None:
    if cfg.bct and old is None:
        raise ConfigError("--bct needs --old DIR (the model whose embedding space to stay compatible with)")
    if cfg.pc and old is None:
        raise ConfigError("--pc needs --old DIR (the model whose right answers to keep)")
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
    """
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise ConfigError("epochs and batch size must be >= 1 and lr > 0")
    if cfg.bct not in (None, "full", "plain"):
        raise ConfigError(f"unknown BCT recipe {cfg.bct!r}: 'full' or 'plain'")
    if cfg.pc not in (None, *PC_KINDS):
        raise ConfigError(f"unknown PC loss {cfg.pc!r}: choose one of {', '.join(PC_KINDS)}")
    pc = cfg.pc_loss()
    weights = cfg.bct_weights()
    out = Path(cfg.out)
    version = check_version_name(out.name)
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
    prep = Preprocess(
        channels=train_set.images.shape[1], height=train_set.images.shape[2], width=train_set.images.shape[3]
    )
    model = build_model(
        cfg.arch,
        classes,
        width=cfg.width,
        depth=cfg.depth,
        embedding_dim=cfg.embedding_dim,
        scale=cfg.scale,
        in_channels=prep.channels,
    )

    old_head = centres = None
    if cfg.bct and old is not None:
        old_prep = old.preprocess
        # Old-model class means over the *new* training set: synthesised rows for unseen classes, and centres.
        old_emb_rows = embed_rows(
            old.model,
            ((old_prep(x), y) for x, y in _batches(train_set, 1024, None)),
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

    history: list[dict[str, float]] = []
    step, t0 = 0, time.perf_counter()
    model.train()
    for epoch in range(cfg.epochs):
        sums: dict[str, float] = {}
        for xb, yb in _batches(train_set, cfg.batch_size, gen):
            x8 = augment(xb, gen) if cfg.augment else xb
            emb, logits = model(prep(x8))  # (B, D), (B, K)
            rows = model.label_to_row(yb)
            terms = {"task": task_loss(logits, rows)}
            old_emb = old_logits = None
            if old is not None and (
                pc_rows is not None or (old_head is not None and weights.to_old_embedding)
            ):
                with torch.no_grad():
                    old_emb, old_logits = old.model(old.preprocess(x8))  # (B, D_old), (B, K_old)
            if old_head is not None:
                terms.update(bct_losses(emb, rows, old_head, weights, centres, old_emb))
            if pc is not None and pc_rows is not None and old is not None and old_logits is not None:
                terms.update(focal_distillation(logits, old_logits, old.model.label_to_row(yb), pc_rows, pc))
            loss = sum(terms.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[union-attr]
            opt.step()
            sched.step()
            step += 1
            scalars = {k: float(v.detach()) for k, v in terms.items()}
            for k, v in scalars.items():
                sums[k] = sums.get(k, 0.0) + v
            if progress:
                progress(step, total, scalars)
        history.append({"epoch": epoch + 1, **{k: v / steps_per_epoch for k, v in sums.items()}})
        log.info("epoch %d/%d %s", epoch + 1, cfg.epochs, history[-1])
    seconds = time.perf_counter() - t0
    model.eval()

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
            "seconds": round(seconds, 1),
            "images_per_second": round(len(train_set) * cfg.epochs / seconds, 1),
        },
    )
    card = save_model(out, model, card)
    card = _attach_metrics(out, card, old, cfg)
    return TrainResult(card=card, path=out, history=history, seconds=seconds)


def _attach_metrics(out: Path, card: ModelCard, old: LoadedModel | None, cfg: TrainConfig) -> ModelCard:
    """Evaluate the new model (and its compatibility with ``old``) on the test split and store it in the card."""
    from trainer.evaluate import evaluate_models

    new = load_model(out)
    test = load_split(cfg.data, "test")
    if cfg.eval_limit:
        test = test.take(cfg.eval_limit, seed=0)
    models = [old, new] if old is not None else [new]
    report = evaluate_models(models, test)
    card = card.model_copy(update={"metrics": report.card_metrics(new.version)})
    return save_model(out, new.model, card)


def _resolved(cfg: TrainConfig) -> dict[str, object]:
    """The BCT weights a run actually used: a recipe whose defaults change must not reuse older models."""
    return {"bct_weights": asdict(cfg.bct_weights()) if cfg.bct else None}


def reusable(cfg: TrainConfig) -> bool:
    """True when ``cfg.out`` holds a complete model trained with the same settings (threads aside).

    A folder is complete once its card exists (written last), so an interrupted run is never reused.
    """
    from trainer.artifact import read_card
    from trainer.errors import ModelCardError

    wanted = {k: v for k, v in {**asdict(cfg), **_resolved(cfg)}.items() if k not in ("out", "threads")}
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
    return all(have.get(k) == v for k, v in wanted.items())
