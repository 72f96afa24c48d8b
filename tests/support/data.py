"""A tiny seeded synthetic dataset in the IDX format (so tests never need the real one), and tiny model
versions trained on it."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def _write_idx(path: Path, arr: np.ndarray) -> None:
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def make_images(
    labels: np.ndarray, rng: np.random.Generator, size: int = 28, classes: int = 10
) -> np.ndarray:
    """Each class is a fixed random blob pattern; each image that pattern shifted a little, plus noise."""
    templates = np.random.default_rng(1234).random((classes, size, size)) > 0.72
    out = np.empty((len(labels), size, size), dtype=np.uint8)
    for i, c in enumerate(labels):
        img = (
            np.roll(templates[c], shift=tuple(rng.integers(-1, 2, size=2)), axis=(0, 1)).astype(np.float32)
            * 200
        )
        img += rng.normal(0, 25, size=(size, size))
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def write_tiny_dataset(
    root: Path, per_class_train: int = 40, per_class_test: int = 20, seed: int = 0
) -> Path:
    """IDX files named like Fashion-MNIST's, with 10 classes of synthetic 28x28 images."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, per in (("train", per_class_train), ("t10k", per_class_test)):
        labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), per))
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", make_images(labels, rng))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def train_tiny_models(root: Path, data: Path) -> Path:
    """Under ``root``: v1 (classes 0-4), v2 (BCT child of v1, all classes, wider), v2-indep (all classes,
    no BCT), each trained for two epochs on the tiny dataset at ``data``."""
    from trainer.train import TrainConfig, train

    common = dict(data=str(data), epochs=2, batch_size=64, threads=1)
    train(TrainConfig(out=str(root / "v1"), classes="0-4", **common))
    train(TrainConfig(out=str(root / "v2"), old=str(root / "v1"), bct="full", width=12, **common))
    train(TrainConfig(out=str(root / "v2-indep"), seed=1, **common))
    return root
