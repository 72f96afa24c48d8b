"""Backward-compatible weight interpolation (BCWI; Schumann et al., EACL 2024): no training, a new model
version whose weights are ``(1 - alpha) * new + alpha * old``, tensor by tensor of the state dict.

The two models must be the same network: the same architecture, the same classes in the same head order and
the same input contract, so every tensor has a partner of the same shape. Floating tensors are interpolated,
BatchNorm's running statistics included (a linear mix of the two, not the statistics the mixed network
would measure); integer buffers (BatchNorm's ``num_batches_tracked``) are taken from the new model.
``alpha`` 0 gives the new model's weights exactly, 1 the old's.

The card records the interpolation (``train_config``: method, both versions and their weights' checksums,
alpha). Its space: the two models' space when they share one (a BCT child and its parent: the mix stays
in that space); otherwise the interpolated model founds its own (its embeddings are neither model's), so a
service measures it before it serves any gallery.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from trainer.artifact import LoadedModel, ModelCard, check_version_name, load_model, save_model
from trainer.errors import ConfigError, IncompatibleModelsError, ModelCardError
from trainer.model import EmbeddingModel

log = logging.getLogger(__name__)

METHOD = "bcwi"


@dataclass
class InterpolateConfig:
    """Everything that determines an interpolation; stored in the card's ``train_config``."""

    old: str
    new: str
    alpha: float
    out: str
    data: str | None = None  # the dataset whose test split the card's metrics are measured on
    evaluate: bool = True  # measure the card's metrics (old, new and the interpolated model)
    eval_limit: int | None = None
    threads: int | None = None
    workers: int | None = None


@dataclass
class InterpolateResult:
    card: ModelCard
    path: Path
    seconds: float = 0.0


def check_alpha(alpha: float) -> float:
    """``alpha`` in [0, 1] (the old model's share), else :class:`ConfigError`."""
    if not isinstance(alpha, int | float) or math.isnan(alpha) or not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"--alpha must be in [0, 1] (the old model's share of the weights), got {alpha}")
    return float(alpha)


def interpolate_states(
    old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * new + alpha * old`` for every floating tensor of two state dicts of one network;
    integer tensors (counters) are the new model's. Raises :class:`IncompatibleModelsError` on other names,
    shapes or dtypes."""
    alpha = check_alpha(alpha)
    if set(old) != set(new):
        only_old, only_new = sorted(set(old) - set(new)), sorted(set(new) - set(old))
        raise IncompatibleModelsError(
            f"the two models hold different tensors (only old: {only_old[:5]}, only new: {only_new[:5]})"
        )
    out: dict[str, torch.Tensor] = {}
    for name, n in new.items():
        o = old[name]
        if o.shape != n.shape or o.dtype != n.dtype:
            raise IncompatibleModelsError(
                f"tensor {name}: old {tuple(o.shape)} {o.dtype}, new {tuple(n.shape)} {n.dtype}"
            )
        if n.is_floating_point():
            # lerp(new, old, a) = new + a * (old - new): exactly new at 0 and exactly old at 1
            out[name] = torch.lerp(n.detach(), o.detach(), alpha)
        else:
            out[name] = n.detach().clone()
    return out


def check_interpolable(old: LoadedModel, new: LoadedModel) -> None:
    """Raise :class:`IncompatibleModelsError` unless ``old`` and ``new`` are plain graceful networks of one
    architecture, classes layout and input contract (so their weights can be mixed tensor by tensor)."""
    for role, m in (("--old", old), ("--new", new)):
        if not isinstance(m.model, EmbeddingModel):
            kind = (
                "an adapter version"
                if m.card.adapter_of
                else "an external version"
                if m.card.external
                else f"a {m.card.format} version"
            )
            raise IncompatibleModelsError(
                f"{role} {m.version} is {kind}: only graceful networks (safetensors weights) are interpolated"
            )
    if list(old.card.classes) != list(new.card.classes):
        raise IncompatibleModelsError(
            f"classes differ (old {old.card.classes}, new {new.card.classes}): weight interpolation needs "
            "the same head rows in the same order"
        )
    if old.card.arch != new.card.arch:
        diff = sorted(
            k for k in set(old.card.arch) | set(new.card.arch) if old.card.arch.get(k) != new.card.arch.get(k)
        )
        what = ", ".join(f"{k}: {old.card.arch.get(k)} vs {new.card.arch.get(k)}" for k in diff)
        raise IncompatibleModelsError(
            f"architectures differ ({what}): weight interpolation needs the same network"
        )
    if old.preprocess != new.preprocess:
        raise IncompatibleModelsError(
            f"input contracts differ (old {old.card.preprocess}, new {new.card.preprocess}): weight "
            "interpolation needs models that read the same inputs"
        )


def interpolate(cfg: InterpolateConfig) -> InterpolateResult:
    """Write model version ``cfg.out``: the weights of ``cfg.new`` and ``cfg.old`` mixed by ``cfg.alpha``."""
    alpha = check_alpha(cfg.alpha)
    out = Path(cfg.out)
    version = check_version_name(out.name)
    for role, folder in (("--old", cfg.old), ("--new", cfg.new)):
        if not Path(folder).is_dir():
            raise ModelCardError(f"{role} model folder {folder} does not exist")
        if out.resolve() == Path(folder).resolve():
            raise ConfigError(f"--out {out} is the {role} model's folder: write the interpolation elsewhere")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    old, new = load_model(cfg.old), load_model(cfg.new)
    if len({old.version, new.version, version}) < 3:
        raise ConfigError(
            f"--old ({old.version}), --new ({new.version}) and --out ({version}) must be three different "
            "versions"
        )
    check_interpolable(old, new)
    assert isinstance(old.model, EmbeddingModel) and isinstance(new.model, EmbeddingModel)
    state = interpolate_states(old.model.state_dict(), new.model.state_dict(), alpha)
    model = copy.deepcopy(new.model)
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    seconds = time.perf_counter() - t0

    same_space = old.card.space == new.card.space
    card = ModelCard(
        version=version,
        arch=new.card.arch,
        embedding_dim=new.card.embedding_dim,
        classes=list(new.card.classes),
        class_names=list(new.card.class_names),
        space=new.card.space if same_space else version,
        compatible_with=new.card.compatible_with if same_space else None,
        preprocess=new.card.preprocess,
        train_config={
            "method": METHOD,
            "formula": "(1 - alpha) * new + alpha * old",
            **asdict(cfg),
            "alpha": alpha,
            "old_version": old.version,
            "new_version": new.version,
            "old_weights_sha256": old.card.weights_sha256,
            "new_weights_sha256": new.card.weights_sha256,
            "seconds": round(seconds, 3),
        },
    )
    card = save_model(out, model, card)
    if cfg.evaluate:
        card = _attach_metrics(out, card, old, new, cfg)
    log.info("interpolated %s = %g * %s + %g * %s", version, 1 - alpha, new.version, alpha, old.version)
    return InterpolateResult(card=card, path=out, seconds=seconds)


def _attach_metrics(
    out: Path, card: ModelCard, old: LoadedModel, new: LoadedModel, cfg: InterpolateConfig
) -> ModelCard:
    """Compatibility matrix and flips of old, new and the interpolated model on the test split, into its
    card."""
    from trainer.data import load_split
    from trainer.evaluate import evaluate_models

    mixed = load_model(out)
    test = load_split(cfg.data, "test")
    if cfg.eval_limit:
        test = test.take(cfg.eval_limit, seed=0)
    report = evaluate_models([old, new, mixed], test, workers=cfg.workers)
    card = card.model_copy(update={"metrics": report.card_metrics(card.version)})
    assert isinstance(mixed.model, EmbeddingModel)
    return save_model(out, mixed.model, card)
