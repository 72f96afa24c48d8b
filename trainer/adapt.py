"""Building an adapter version: embed a sample with the new and the old model, fit the map, save, evaluate.

The result is a model version folder next to the new model's: its card says ``space`` = the old model's
space, ``compatible_with`` = the old version and ``adapter_of`` = the new version, so a service activates it
over a gallery of old embeddings with no backfill (queries: new model, then adapter).

The two models may take different inputs (say a 28x28 grey old model and a 64x64 RGB new one): each embeds
the same sample images through its own input contract (``trainer.evaluate.embed_models``), and the adapter
version takes the new model's contract.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trainer.adapter import ADAPTER_KINDS, AdaptedModel, MLPFit, class_mean_head, fit_adapter
from trainer.artifact import LoadedModel, ModelCard, check_version_name, load_model, save_model
from trainer.data import load_split
from trainer.errors import ConfigError
from trainer.evaluate import embed_models

log = logging.getLogger(__name__)


@dataclass
class AdaptConfig:
    """Everything that determines an adapter fit; stored in the adapter card as ``train_config``."""

    new: str
    old: str
    out: str
    kind: str = "procrustes"
    sample: int | None = 5000  # items embedded by both models; None = the whole split
    data: str | None = None
    split: str = "train"
    seed: int = 0
    hidden: int = 256  # mlp only
    steps: int = 3000  # mlp only
    eval_limit: int | None = None  # evaluate the card's metrics on a slice of the test split
    threads: int | None = None
    workers: int | None = None  # image-folder decoding processes; None = trainer.data.default_workers()


@dataclass
class AdaptResult:
    card: ModelCard
    path: Path
    fit: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def _check(cfg: AdaptConfig) -> tuple[LoadedModel, LoadedModel]:
    if cfg.kind not in ADAPTER_KINDS:
        raise ConfigError(f"unknown adapter kind {cfg.kind!r}: choose one of {', '.join(ADAPTER_KINDS)}")
    if cfg.sample is not None and cfg.sample < 2:
        raise ConfigError(f"--sample must be at least 2 items, got {cfg.sample}")
    out, new_dir = Path(cfg.out), Path(cfg.new)
    check_version_name(out.name)
    if out.resolve().parent != new_dir.resolve().parent:
        raise ConfigError(
            f"the adapter folder must sit next to the new model's folder (same models dir): "
            f"use --out {new_dir.resolve().parent / out.name}"
        )
    new, old = load_model(cfg.new), load_model(cfg.old)
    for role, m in (("--new", new), ("--old", old)):
        if m.card.adapter_of is not None:
            raise ConfigError(
                f"{role} {m.version} is an adapter version: adapt from and to plain model versions"
            )
    if new.version == old.version or out.name in (new.version, old.version):
        raise ConfigError("--new, --old and --out must be three different versions")
    return new, old


def adapt(cfg: AdaptConfig) -> AdaptResult:
    """Fit an adapter from ``cfg.new``'s space into ``cfg.old``'s and save it as version ``cfg.out``."""
    new, old = _check(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    split = load_split(cfg.data, cfg.split)
    sample = split.take(cfg.sample, seed=cfg.seed) if cfg.sample else split
    t0 = time.perf_counter()
    # The same images, each model through its own contract.
    embs = embed_models([new, old], sample, workers=cfg.workers)
    x, y = embs[new.version], embs[old.version]  # (N, D_new), (N, D_old)
    t_embed = time.perf_counter() - t0
    adapter, info = fit_adapter(cfg.kind, x, y, MLPFit(hidden=cfg.hidden, steps=cfg.steps, seed=cfg.seed))
    seconds = time.perf_counter() - t0 - t_embed
    with torch.no_grad():
        adapted = F.normalize(adapter(torch.from_numpy(x)), dim=1).numpy()  # (N, D_old)
    scale = float(new.model.head.scale)
    head, classes = class_mean_head(adapted, sample.labels, list(new.card.classes), scale)
    missing = sorted(set(new.card.classes) - set(classes))
    if missing:
        log.warning(
            "the sample has no image of classes %s: the adapter's class-mean head leaves them out", missing
        )
    adapter.cfg = replace(adapter.cfg, scale=scale)
    model = AdaptedModel(new.model, adapter, head, classes)  # type: ignore[arg-type]
    out = Path(cfg.out)
    names = new.card.class_names
    card = ModelCard(
        version=out.name,
        arch=adapter.cfg.to_dict(),
        embedding_dim=adapter.cfg.embedding_dim,
        classes=classes,
        class_names=[names[new.card.classes.index(c)] for c in classes] if names else [],
        space=old.card.space,
        compatible_with=old.version,
        adapter_of=new.version,
        adapter_of_sha256=new.card.weights_sha256,
        preprocess=new.card.preprocess,
        train_config={
            **asdict(cfg),
            "sample_size": len(sample),
            "fit": info,
            "seconds": round(seconds, 2),
            "embed_seconds": round(t_embed, 1),
        },
    )
    card = save_model(out, model, card)
    card = _attach_metrics(out, card, old, new, cfg)
    log.info("adapter %s (%s, %d pairs): %s", card.version, cfg.kind, len(sample), info)
    return AdaptResult(card=card, path=out, fit=info, seconds=seconds)


def _attach_metrics(
    out: Path, card: ModelCard, old: LoadedModel, new: LoadedModel, cfg: AdaptConfig
) -> ModelCard:
    """Compatibility matrix of old, new and the adapter version on the test split, stored in its card."""
    from trainer.evaluate import evaluate_models

    adapted = load_model(out)
    test = load_split(cfg.data, "test")
    if cfg.eval_limit:
        test = test.take(cfg.eval_limit, seed=0)
    report = evaluate_models([old, new, adapted], test, workers=cfg.workers)
    metrics: dict[str, Any] = report.card_metrics(card.version)
    card = card.model_copy(update={"metrics": metrics})
    return save_model(out, adapted.model, card)


def adapted_embeddings(loaded: LoadedModel, new_embeddings: np.ndarray) -> np.ndarray:
    """Apply a loaded adapter version to (N, D_new) embeddings of its new model -> (N, D_old) unit-norm."""
    model = loaded.model
    if not isinstance(model, AdaptedModel):
        raise ConfigError(f"{loaded.version} is not an adapter version")
    with torch.inference_mode():
        return F.normalize(
            model.adapter(torch.from_numpy(np.ascontiguousarray(new_embeddings))), dim=1
        ).numpy()
