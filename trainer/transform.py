"""Transforms: a learned map from an OLD model's embedding space into a NEW model's, for stored gallery vectors.

The mirror image of ``trainer.adapter``: an adapter maps new -> old so new *queries* search an old gallery;
a transform maps old -> new so the gallery's stored old vectors are upgraded without re-reading any image
(FCT, "Forward Compatible Training", CVPR 2022, without side information). It is fitted exactly like an
adapter (``fit_adapter`` on pairs of embeddings of the same sample images, each model through its own input
contract), with x = old embeddings (N, D_old) and y = new embeddings (N, D_new).

On disk a transform lives inside the new model's folder (the space it writes into)::

    <new model>/transforms/<old version>/transform.json      TransformCard (written last: a folder with a
                                                             card is complete)
    <new model>/transforms/<old version>/weights.safetensors the EmbeddingAdapter's state dict

Model loading (``trainer.artifact.load_model``, ``trainer.verify.verify_weights``) and the service's
registry read only ``card.json`` and the weights file of a model folder, so the subfolder is invisible to
them. ``load_transform`` checks the weights' checksum and, when the folder sits in that layout, that the new
model's weights are still the ones the transform was fitted against.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainer.adapter import ADAPTER_KINDS, AdapterConfig, EmbeddingAdapter, MLPFit, fit_adapter
from trainer.artifact import (
    CARD_FILE,
    NAME_PATTERN,
    LoadedModel,
    ModelCard,
    check_version_name,
    file_sha256,
    load_model,
    read_card,
)
from trainer.errors import ModelCardError, TrainerError, TransformError

log = logging.getLogger(__name__)

TRANSFORMS_DIR = "transforms"
TRANSFORM_FILE = "transform.json"
TRANSFORM_WEIGHTS = "weights.safetensors"
TRANSFORM_FORMAT = "graceful-transform/1"
HOLDOUT = 0.1  # share of the sample held out for the reported held-out cosine
MIN_HOLDOUT_SAMPLE = 20  # below this a held-out slice says nothing: no held-out fit

Progress = Callable[[str], None]  # one line for people per stage (embedded, fitted, saved)


def transform_dir(new_model_dir: str | os.PathLike[str], source_version: str) -> Path:
    """``<new model folder>/transforms/<source_version>``; the version must be a plain version name (no path)."""
    try:
        check_version_name(source_version)
    except ModelCardError as e:
        raise TransformError(str(e)) from None
    return Path(new_model_dir) / TRANSFORMS_DIR / source_version


class TransformCard(BaseModel):
    """What a transform says about itself (``transform.json``): old space -> new space, and how it was fitted."""

    model_config = ConfigDict(extra="allow", frozen=True)

    format: str = TRANSFORM_FORMAT
    source: str = Field(min_length=1, max_length=128, pattern=NAME_PATTERN)  # the old version
    source_space: str
    source_sha256: str = Field(min_length=1)  # the old model's weights_sha256 when fitted
    target: str = Field(min_length=1, max_length=128, pattern=NAME_PATTERN)  # the new version
    target_space: str
    target_sha256: str = Field(min_length=1)
    kind: str
    in_dim: int = Field(gt=0)  # the old model's embedding_dim
    out_dim: int = Field(gt=0)  # the new model's embedding_dim
    sample_size: int = Field(ge=2)
    adapter: dict[str, Any]  # AdapterConfig.to_dict(): what load_transform rebuilds
    fit: dict[str, Any] = Field(default_factory=dict)
    weights: str = TRANSFORM_WEIGHTS
    weights_sha256: str = Field(min_length=1)
    seconds: float = 0.0
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    train_config: dict[str, Any] = Field(default_factory=dict)


class VectorTransform:
    """A loaded transform: ``apply`` maps (N, in_dim) old-space vectors to (N, out_dim) new-space ones."""

    def __init__(self, card: TransformCard, module: EmbeddingAdapter, path: Path | None = None) -> None:
        self.card = card
        self.module = module.eval().requires_grad_(False)
        self.path = path

    @property
    def in_dim(self) -> int:
        return self.card.in_dim

    @property
    def out_dim(self) -> int:
        return self.card.out_dim

    def apply(self, vectors: np.ndarray, batch: int = 65536) -> np.ndarray:
        """(N, in_dim) float -> (N, out_dim) float32 with L2-normalised rows, ``batch`` rows at a time."""
        v = np.asarray(vectors)
        if v.ndim != 2 or v.shape[1] != self.in_dim:
            raise TransformError(
                f"transform {self.card.source} -> {self.card.target} takes (N, {self.in_dim}) vectors, "
                f"got shape {v.shape}"
            )
        if batch < 1:
            raise TransformError(f"batch must be >= 1, got {batch}")
        if not np.issubdtype(v.dtype, np.number) or not np.isfinite(v).all():
            raise TransformError("vectors to transform must be finite numbers")
        out = np.empty((len(v), self.out_dim), dtype=np.float32)
        with torch.inference_mode():
            for s in range(0, len(v), batch):
                x = torch.from_numpy(np.array(v[s : s + batch], dtype=np.float32))  # (b, in_dim)
                out[s : s + batch] = F.normalize(self.module(x), dim=1).numpy()  # (b, out_dim)
        return out


@dataclass
class TransformConfig:
    """Everything that determines a transform fit; stored in its card as ``train_config``."""

    old: str  # model folders
    new: str
    data: str | None = None  # dataset or image folder, as load_split takes; None = the default dataset
    split: str = "train"
    sample: int | None = 20000  # a seeded sample of this many images; None = the whole split
    kind: str = "mlp"
    hidden: int = 512  # mlp only
    steps: int = MLPFit.steps  # mlp only
    seed: int = 0
    threads: int | None = None
    workers: int | None = None  # image-folder decoding processes; None = trainer.data.default_workers()


@dataclass
class TransformResult:
    card: TransformCard
    path: Path  # transform_dir(new, old version)
    transform: VectorTransform | None = None  # the fitted transform, as load_transform(path) gives it


# ------------------------------------------------------------------------------------------------ fitting
def _plain_version(card: ModelCard, role: str) -> None:
    if card.adapter_of is not None:
        raise TransformError(
            f"{role} {card.version} is an adapter version: transform between plain model versions"
        )
    if card.external:
        raise TransformError(
            f"{role} {card.version} is external (no image model): a transform is fitted on images both "
            "models embed"
        )
    if not card.weights_sha256:  # the transform pins both models' weights by checksum
        raise TransformError(f"the card of {role} {card.version} states no weights_sha256")


def _check(cfg: TransformConfig) -> tuple[LoadedModel, LoadedModel]:
    if cfg.kind not in ADAPTER_KINDS:
        raise TransformError(f"unknown transform kind {cfg.kind!r}: choose one of {', '.join(ADAPTER_KINDS)}")
    if cfg.sample is not None and cfg.sample < 2:
        raise TransformError(f"the sample must be at least 2 images, got {cfg.sample}")
    if cfg.kind == "mlp" and (cfg.hidden < 1 or cfg.steps < 1):
        raise TransformError(f"--hidden and --steps must be >= 1 (got {cfg.hidden}, {cfg.steps})")
    if Path(cfg.old).resolve() == Path(cfg.new).resolve():
        raise TransformError("--old and --new are the same model folder")
    # Cards first: an external or adapter version is refused before any weights are loaded.
    cards: dict[str, ModelCard] = {}
    for role, folder in (("--old", cfg.old), ("--new", cfg.new)):
        try:
            cards[role] = read_card(folder)
        except ModelCardError as e:
            raise TransformError(f"{role}: {e}") from None
        _plain_version(cards[role], role)
    if cards["--old"].version == cards["--new"].version:
        raise TransformError(f"--old and --new are both version {cards['--old'].version}")
    try:
        old, new = load_model(cfg.old), load_model(cfg.new)
    except ModelCardError as e:
        raise TransformError(str(e)) from None
    if old.card.embedding_dim != new.card.embedding_dim and cfg.kind == "procrustes":
        raise TransformError(
            f"a procrustes transform needs equal sizes (old {old.card.embedding_dim}, new "
            f"{new.card.embedding_dim}): use --kind affine or mlp"
        )
    return old, new


def _holdout_cos(kind: str, x: np.ndarray, y: np.ndarray, fit: MLPFit, seed: int) -> dict[str, float]:
    """Mean cosine on a 10% slice held out of a second fit on the other 90% (the final fit uses every pair)."""
    n = len(x)
    if n < MIN_HOLDOUT_SAMPLE:
        return {}
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(n * HOLDOUT))
    val, tr = order[:n_val], order[n_val:]
    module, _ = fit_adapter(kind, x[tr], y[tr], fit)
    with torch.no_grad():
        pred = module(torch.from_numpy(x[val]).float())  # (n_val, D_new)
        cos = F.cosine_similarity(pred, torch.from_numpy(y[val]).float(), dim=1).mean()
    return {"holdout_cos": float(cos), "holdout_n": float(n_val)}


def fit_transform(cfg: TransformConfig, progress: Progress | None = None) -> TransformResult:
    """Fit a map from ``cfg.old``'s space into ``cfg.new``'s and save it in ``transform_dir(cfg.new, old)``,
    replacing an earlier fit of the same pair."""
    from trainer.data import load_split
    from trainer.evaluate import embed_models

    say = progress or (lambda _msg: None)
    old, new = _check(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    split = load_split(cfg.data, cfg.split)
    sample = split.take(cfg.sample, seed=cfg.seed) if cfg.sample else split
    if len(sample) < 2:
        raise TransformError(f"the {cfg.split} split has {len(sample)} images: a fit needs at least 2")
    t0 = time.perf_counter()
    # The same images, each model through its own contract.
    embs = embed_models([new, old], sample, workers=cfg.workers)
    x, y = embs[old.version], embs[new.version]  # (N, D_old), (N, D_new)
    t_embed = time.perf_counter() - t0
    say(f"embedded {len(sample)} images with {old.version} and {new.version} ({t_embed:.1f}s)")
    mlp = MLPFit(hidden=cfg.hidden, steps=cfg.steps, seed=cfg.seed)
    t1 = time.perf_counter()
    try:
        module, info = fit_adapter(cfg.kind, x, y, mlp)
        info = {**info, **_holdout_cos(cfg.kind, x, y, mlp, cfg.seed)}
    except TrainerError as e:  # ConfigError from the fit: the same one-line message, as a TransformError
        raise TransformError(str(e)) from None
    seconds = time.perf_counter() - t1
    say(f"fitted a {cfg.kind} transform ({seconds:.1f}s)")
    card = TransformCard(
        source=old.version,
        source_space=old.card.space,
        source_sha256=str(old.card.weights_sha256),
        target=new.version,
        target_space=new.card.space,
        target_sha256=str(new.card.weights_sha256),
        kind=cfg.kind,
        in_dim=x.shape[1],
        out_dim=y.shape[1],
        sample_size=len(sample),
        adapter=module.cfg.to_dict(),
        fit={**info, "embed_seconds": round(t_embed, 2)},
        weights_sha256="pending",  # set by _save from the file written
        seconds=round(seconds, 3),
        train_config=asdict(cfg),
    )
    path = transform_dir(cfg.new, old.version)
    card = _save(path, module, card)
    say(f"saved to {path}")
    log.info("transform %s -> %s (%s, %d pairs): %s", card.source, card.target, cfg.kind, len(sample), info)
    return TransformResult(card=card, path=path, transform=VectorTransform(card, module, path))


def _save(path: Path, module: EmbeddingAdapter, card: TransformCard) -> TransformCard:
    """Write into a hidden sibling folder, then rename it into place: readers see the old fit or the new one,
    never half of one (replacing an existing fit takes two renames; between them the pair has no transform)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        save_file(state, str(tmp / card.weights), metadata={"format": TRANSFORM_FORMAT})
        card = card.model_copy(update={"weights_sha256": file_sha256(tmp / card.weights)})
        (tmp / TRANSFORM_FILE).write_text(json.dumps(card.model_dump(mode="json"), indent=2) + "\n")
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return card


# ------------------------------------------------------------------------------------------------ loading
def read_transform_card(path: str | os.PathLike[str]) -> TransformCard:
    """Read and validate ``transform.json`` of a transform folder, and check its weights file's checksum."""
    path = Path(path)
    f = path / TRANSFORM_FILE
    if not f.is_file():
        raise TransformError(f"{path} has no {TRANSFORM_FILE}")
    try:
        raw = json.loads(f.read_text())
        if not isinstance(raw, dict):
            raise TransformError(f"{f} must hold a JSON object")
        card = TransformCard.model_validate(raw)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TransformError(f"{f} is not valid JSON: {e}") from None
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'card'}: {err['msg']}" for err in e.errors()
        )
        raise TransformError(f"{f} is not a valid transform card: {problems}") from None
    if card.format != TRANSFORM_FORMAT:
        raise TransformError(
            f"{f}: unknown format {card.format!r} (this graceful reads {TRANSFORM_FORMAT!r})"
        )
    if card.weights != TRANSFORM_WEIGHTS:  # a fixed name: a card cannot point outside its folder
        raise TransformError(f"{f}: weights must be {TRANSFORM_WEIGHTS!r}, got {card.weights!r}")
    weights = path / card.weights
    if weights.is_symlink() or not weights.is_file():
        raise TransformError(f"{path} has no regular weights file {card.weights} (links are refused)")
    if file_sha256(weights) != card.weights_sha256:
        raise TransformError(f"{weights} does not match the checksum in its card (corrupt or replaced)")
    _check_target(path, card)
    return card


def _check_target(path: Path, card: TransformCard) -> None:
    """In the standard layout, the new model whose folder holds the transform must be the one it was fitted to:
    a model retrained in place leaves a stale transform behind, which must not be applied."""
    if path.parent.name != TRANSFORMS_DIR or not (path.parent.parent / CARD_FILE).is_file():
        return
    try:
        model = read_card(path.parent.parent)
    except ModelCardError as e:
        raise TransformError(f"the model folder holding {path} is not valid: {e}") from None
    if model.version != card.target or model.weights_sha256 != card.target_sha256:
        raise TransformError(
            f"transform {card.source} -> {card.target} in {path} was fitted against other weights than "
            f"model {model.version}'s: fit it again"
        )


def load_transform(path: str | os.PathLike[str]) -> VectorTransform:
    """Load a transform folder; raises ``TransformError`` on a missing or malformed card, missing weights,
    a checksum mismatch, or tensors that do not fit the card."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    card = read_transform_card(path)
    try:
        cfg = AdapterConfig.from_dict(card.adapter)
    except (TrainerError, TypeError) as e:
        raise TransformError(f"{path}: the card's adapter config is not valid: {e}") from None
    if (cfg.kind, cfg.in_dim, cfg.embedding_dim) != (card.kind, card.in_dim, card.out_dim):
        raise TransformError(f"{path}: the card's adapter config does not match its kind and sizes")
    try:
        state = load_file(str(path / card.weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise TransformError(f"{path / card.weights} is not a safetensors file ({e})") from None
    module = EmbeddingAdapter(cfg)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise TransformError(
            f"{path / card.weights} does not fit the card's adapter: {str(e).splitlines()[0]}"
        ) from None
    return VectorTransform(card, module, path)


def list_transforms(new_model_dir: str | os.PathLike[str]) -> list[TransformCard]:
    """The card of every valid transform in ``<new model>/transforms/``, by source version; broken ones are
    skipped with a warning (saying why)."""
    root = Path(new_model_dir) / TRANSFORMS_DIR
    if not root.is_dir():
        return []
    cards = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or not p.is_dir():  # a fit being written (see _save)
            continue
        try:
            card = read_transform_card(p)
            if card.source != p.name:
                raise TransformError(f"{p} holds a transform from {card.source!r}, not from {p.name!r}")
        except TransformError as e:
            log.warning("transform %s skipped: %s", p, e)
            continue
        cards.append(card)
    return cards


# ----------------------------------------------------------------------------------------------- evaluating
def evaluate_transform(
    transform: VectorTransform,
    old: LoadedModel,
    new: LoadedModel,
    data: str | None = None,
    limit: int | None = None,
    workers: int | None = None,
) -> dict[str, dict[str, float] | None]:
    """Retrieval on the test split (queries: index % 5 == 0, gallery: the rest): ``new/old`` (raw; None when the
    sizes differ), ``new/transformed-old``, ``new/new``, ``old/old`` (top1, top5, mAP), and ``update_gain``
    of new/transformed-old per metric."""
    from trainer.data import load_split, query_gallery_split
    from trainer.evaluate import embed_models
    from trainer.metrics import retrieval_metrics, update_gain

    test = load_split(data, "test")
    if limit:
        test = test.take(limit, seed=0)
    embs = embed_models([new, old], test, workers=workers)
    e_new, e_old = embs[new.version], embs[old.version]  # (N, D_new), (N, D_old)
    e_tr = transform.apply(e_old)  # (N, D_new)
    q, g = query_gallery_split(len(test))
    labels = test.labels

    def cell(queries: np.ndarray, gallery: np.ndarray) -> dict[str, float]:
        return retrieval_metrics(queries[q], labels[q], gallery[g], labels[g])

    out: dict[str, dict[str, float] | None] = {
        "new/old": cell(e_new, e_old) if e_new.shape[1] == e_old.shape[1] else None,
        "new/transformed-old": cell(e_new, e_tr),
        "new/new": cell(e_new, e_new),
        "old/old": cell(e_old, e_old),
    }
    nt, nn, oo = out["new/transformed-old"], out["new/new"], out["old/old"]
    assert nt is not None and nn is not None and oo is not None
    out["update_gain"] = {m: update_gain(nt[m], oo[m], nn[m]) for m in ("top1", "top5", "mAP")}
    return out
