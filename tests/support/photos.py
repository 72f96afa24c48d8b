"""Tiny photo-like folder datasets for the folder, render and adapter-contract tests: the tiny synthetic IDX
items (tests.support.data) rendered by scripts/render_photos.py, small canvases, mixed modes and formats."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

from tests.support.data import make_images

REPO = Path(__file__).resolve().parents[2]


def render_script() -> ModuleType:
    """scripts/render_photos.py as a module (scripts/ is no package)."""
    name = "render_photos"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "render_photos.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def tiny_items(per_class: int, seed: int, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 class-patterned items and (N,) labels, ``per_class`` of each class."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(classes, dtype=np.uint8), per_class))
    return make_images(labels, rng), labels.astype(np.int64)


def write_tiny_photos(
    root: Path, per_class_train: int = 4, per_class_test: int = 2, max_size: int = 96, seed: int = 0
) -> Path:
    """``root/train/<class>/``, ``root/test/<class>/``: rendered items at 40-``max_size`` px, JPEG and PNG,
    grey, RGB and RGBA, a quarter with an EXIF orientation; ``root/manifest.csv``."""
    rp = render_script()
    splits = {
        "train": tiny_items(per_class_train, seed),
        "test": tiny_items(per_class_test, seed + 1),
    }
    opts = rp.RenderOptions(min_size=40, max_size=max_size, png_share=0.3, exif_share=0.3, mixed_modes=True)
    rp.render(root, splits, [f"c{i}" for i in range(10)], seed=seed, opts=opts)
    return root
