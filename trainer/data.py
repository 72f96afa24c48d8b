"""Datasets: IDX files of the MNIST family, folders of images, class subsets and the retrieval split.

Images are kept as uint8 arrays of shape (N, C, H, W); labels as int64 (N,). Converting to float and
normalising is the model's job (see ``trainer.preprocess``), so a dataset is cheap to hold and to slice.
"""

from __future__ import annotations

import gzip
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainer.errors import DatasetError

# The Debian package `dataset-fashion-mnist` installs here (under the system prefix).
DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "install it with `apt-get install -y dataset-fashion-mnist` or pass --data DIR"

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


@dataclass(frozen=True)
class Dataset:
    """Images (N, C, H, W) uint8, labels (N,) int64, and the names of all classes of the source."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise DatasetError(
                f"images must be uint8 (N, C, H, W), got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise DatasetError(f"{self.labels.shape[0]} labels for {self.images.shape[0]} images")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else int(self.labels.max()) + 1

    def subset(self, classes: Sequence[int]) -> Dataset:
        """The images whose label is in ``classes`` (labels keep their original values)."""
        unknown = sorted(set(classes) - set(range(self.num_classes)))
        if unknown:
            raise DatasetError(
                f"classes {unknown} do not exist: this dataset has classes 0-{self.num_classes - 1}"
            )
        mask = np.isin(self.labels, np.asarray(list(classes), dtype=np.int64))
        return Dataset(self.images[mask], self.labels[mask], self.class_names)

    def take(self, n: int, seed: int = 0) -> Dataset:
        """A seeded random slice of at most ``n`` images, for tests and quick runs."""
        if n >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        return Dataset(self.images[idx], self.labels[idx], self.class_names)


def parse_classes(spec: str | Sequence[int] | None, num_classes: int | None = None) -> list[int]:
    """Parse a class selection like ``"0-4"``, ``"0,2,5-7"`` or a list; None means every class."""
    if spec is None:
        if num_classes is None:
            raise DatasetError("a class selection needs the number of classes")
        return list(range(num_classes))
    if not isinstance(spec, str):
        out = sorted({int(c) for c in spec})
    else:
        out_set: set[int] = set()
        for part in spec.replace(" ", "").split(","):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise DatasetError(f"bad class range {spec!r}: expected e.g. '0-4' or '0,2,5-7'")
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo:
                raise DatasetError(f"bad class range {part!r}: {hi} < {lo}")
            out_set.update(range(lo, hi + 1))
        out = sorted(out_set)
    if not out:
        raise DatasetError(f"class selection {spec!r} is empty")
    if num_classes is not None and out[-1] >= num_classes:
        raise DatasetError(
            f"unknown class {out[-1]} in {spec!r}: the dataset has classes 0-{num_classes - 1}"
        )
    return out


def query_gallery_split(n: int, every: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the retrieval protocol: queries are those divisible by ``every``, the gallery the rest."""
    idx = np.arange(n)
    return idx[idx % every == 0], idx[idx % every != 0]


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path} is truncated (header)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetError(
            f"{path} is truncated or padded: {len(raw) - header} bytes of data, expected {expected}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(root: Path, prefix: str, kind: str) -> Path | None:
    for name in (
        f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte",
        f"{prefix}-{kind}.idx{3 if kind == 'images' else 1}-ubyte",
    ):
        for cand in (root / name, root / f"{name}.gz"):
            if cand.is_file():
                return cand
    return None


def _load_idx_split(root: Path, split: str) -> Dataset:
    prefix = _SPLIT_PREFIX[split]
    img_path, lbl_path = _find_idx(root, prefix, "images"), _find_idx(root, prefix, "labels")
    if img_path is None or lbl_path is None:
        raise DatasetError(
            f"no IDX files for split {split!r} in {root}: expected {prefix}-images-idx3-ubyte[.gz] and "
            f"{prefix}-labels-idx1-ubyte[.gz]; {INSTALL_HINT}"
        )
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError(
            f"{img_path}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DatasetError(f"{lbl_path}: {labels.shape} labels do not match {images.shape[0]} images")
    names = (
        FASHION_MNIST_CLASSES
        if "fashion" in str(root).lower()
        else [str(i) for i in range(int(labels.max()) + 1)]
    )
    return Dataset(images[:, None, :, :].copy(), labels.astype(np.int64), names)


def _load_image_folder(root: Path, size: int, channels: int) -> Dataset:
    from PIL import Image

    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{root} has no class subfolders")
    images, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    im = im.convert("L" if channels == 1 else "RGB").resize((size, size))
                    arr = np.asarray(im, dtype=np.uint8)
            except OSError as e:
                raise DatasetError(f"cannot decode image {f}: {e}") from e
            images.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise DatasetError(f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) under {root}")
    return Dataset(np.stack(images), np.asarray(labels, dtype=np.int64), classes)


def load_split(
    data_dir: str | os.PathLike[str] | None, split: str, *, size: int = 28, channels: int = 1
) -> Dataset:
    """Load the ``train`` or ``test`` split of a dataset directory.

    The directory holds either IDX files named like Fashion-MNIST's (``train-images-idx3-ubyte[.gz]`` ...)
    or ``train/`` and ``test/`` folders with one subfolder of images per class.
    """
    if split not in _SPLIT_PREFIX:
        raise DatasetError(f"unknown split {split!r}: expected 'train' or 'test'")
    root = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    if not root.is_dir():
        raise DatasetError(f"dataset directory {root} does not exist; {INSTALL_HINT}")
    if (root / split).is_dir():
        return _load_image_folder(root / split, size, channels)
    return _load_idx_split(root, split)
