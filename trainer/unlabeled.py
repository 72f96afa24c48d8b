"""Unlabeled images in BCT: keep the new model compatible on classes no model was trained on.

BCT's losses only see the labelled training set, so the new model's embedding of an image of a class it never
saw is free to land anywhere in the old space, and a gallery always holds such items. Unlabeled images (a
sample of the gallery's own kept sources, or any images of its kind) give the missing constraint: the new
model's embedding of an augmented view of each is pulled towards a target in the old space given by the
frozen old model:

- ``old`` (default): the old model's own embedding of the same augmented view (feature distillation);
- ``neighbours``: the normalised mean of the old embeddings of the image's k nearest neighbours among the
  unlabeled images (itself included), in the old space, computed once from the clean images. Measured as a
  query it ranks v1's gallery slightly better than v1's own embedding on mAP (+0.008 on classes v1 never
  saw) and slightly worse on top-1; as a training target it did no better than ``old`` (BENCHMARKS.md).

An unlabeled set's "label" is each image's row in the targets, so the loaders of labelled data serve it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainer.data import Dataset, ImageFolder, Split, iter_views, load_split
from trainer.errors import ConfigError, DatasetError
from trainer.preprocess import Preprocess

TARGETS = ("neighbours", "old")


@dataclass(frozen=True)
class UnlabeledPull:
    """The unlabeled term: ``weight * mean ||new(aug(x)) - target(x)||^2`` over a batch of ``batch``
    unlabeled images per training step; ``k`` neighbours for the ``neighbours`` target."""

    weight: float = 16.0
    target: str = "old"
    k: int = 10
    batch: int = 128

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ConfigError(f"unlabeled target is one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.weight <= 0 or self.k < 1 or self.batch < 1:
            raise ConfigError(
                f"unlabeled pull needs weight > 0, k >= 1 and batch >= 1, got {self.weight}, {self.k}, "
                f"{self.batch}"
            )


def _rows(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)


def load_unlabeled(path: str | os.PathLike[str], limit: int | None = None, seed: int = 0) -> Split:
    """Unlabeled images from ``path``: a dataset folder (its train split, labels dropped) or any folder of
    image files, searched recursively (a gallery export, class subfolders or none). A seeded sample of at
    most ``limit``. Each image's label is its row (0..N-1), see the module docstring."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"unlabeled images: {root} is not a folder")
    if limit is not None and limit < 1:
        raise ConfigError(f"--unlabeled-limit must be >= 1, got {limit}")
    ds: Split
    try:
        ds = load_split(root, "train")
    except DatasetError:
        try:
            ds = ImageFolder.scan_unlabeled(root)
        except DatasetError as e:
            raise DatasetError(f"{e}, and no dataset split in it") from None
    if limit is not None:
        ds = ds.take(limit, seed=seed)
    if isinstance(ds, Dataset):
        return Dataset(ds.images, _rows(len(ds)), [])
    return ImageFolder(ds.root, ds.files, _rows(len(ds)), [])


@torch.no_grad()
def neighbour_targets(emb: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """(N, D) L2-normalised embeddings -> (N, D) normalised means of each row's k nearest rows (itself
    included) by cosine. Exact, in chunks of ``chunk`` rows: N x N similarities are never held at once."""
    k = min(k, emb.shape[0])
    out = torch.empty_like(emb)
    for i in range(0, emb.shape[0], chunk):
        sims = emb[i : i + chunk] @ emb.T  # (c, N)
        idx = sims.topk(k, dim=1).indices  # (c, k)
        out[i : i + chunk] = F.normalize(emb[idx].mean(1), dim=1)
    return out


@torch.no_grad()
def unlabeled_targets(
    old_model: torch.nn.Module,
    old_prep: Preprocess,
    ds: Split,
    pull: UnlabeledPull,
    workers: int | None = None,
    batch_size: int = 1024,
) -> torch.Tensor:
    """(N, D_old) targets of the unlabeled set ``ds`` in row order: the old model's embeddings of the clean
    images through its own contract, or their neighbour means (``pull.target``)."""
    was_training = old_model.training
    old_model.eval()
    parts = [
        F.normalize(old_model.embed(old_prep(x)), dim=1)  # type: ignore[operator]
        for (x,), _ in iter_views(ds, [old_prep], batch_size, None, workers)
    ]
    old_model.train(was_training)
    emb = torch.cat(parts)
    return neighbour_targets(emb, pull.k) if pull.target == "neighbours" else emb


def unlabeled_loss(new_emb: torch.Tensor, targets: torch.Tensor, weight: float) -> dict[str, torch.Tensor]:
    """The unlabeled term for (B, D) new embeddings and their (B, D) targets."""
    return {"unlabeled": weight * (new_emb - targets).pow(2).sum(1).mean()}
