"""Datasets: IDX files of the MNIST family, folders of images, class subsets and the retrieval split.

IDX data (``Dataset``) is held in memory as uint8 arrays of shape (N, C, H, W), labels int64 (N,): small and
as fast to slice as it gets. A folder of images of any size and colour (``ImageFolder``) is held as file
names only and decoded lazily, by a torch ``DataLoader`` with worker processes (``iter_views``), so memory does
not grow with the dataset. Either way a batch comes as uint8 arrays under a model's input contract
(``trainer.preprocess.Preprocess``); converting to float and normalising is the model's job.
"""

from __future__ import annotations

import gzip
import os
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data

from trainer.errors import DatasetError
from trainer.preprocess import ROTATING_ORIENTATIONS, Preprocess, eight_bit, exif_orientation, upright

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


# ---- folders of images: decoded lazily, one file at a time ------------------------------------------------


def default_workers() -> int:
    """Decoding processes of a folder loader: every core but one (left to the training step), 1 to 4.

    On 2 cores: 1. A photo of a few hundred pixels decodes into a 64x64 view in about 1 ms, several times
    faster than 2 cores train on it (BENCHMARKS.md, "Photos"), so one worker keeps up."""
    return max(1, min(4, (os.cpu_count() or 1) - 1))


def decode_views(path: str | os.PathLike[str], preps: Sequence[Preprocess]) -> list[np.ndarray]:
    """Decode one image file once and prepare it under each contract: one (C, H, W) uint8 array per prep.

    As the service decodes an uploaded image: the EXIF orientation is applied (as ``ImageOps.exif_transpose``
    does); a JPEG is decoded reduced (Pillow's ``draft``, a power-of-two DCT scaling) to no less than the
    largest size any contract resizes it to before its crop or pad; transparency is composited on black. Any
    failure, including Pillow's decompression-bomb limit, is a ``DatasetError`` naming the file.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            orientation = exif_orientation(im)
            if im.format == "JPEG" and preps:
                w, h = im.size
                if orientation in ROTATING_ORIENTATIONS:
                    w, h = h, w  # the contracts see the image upright
                sizes = [p.scaled_size(w, h) for p in preps]
                need_w, need_h = max(s[0] for s in sizes), max(s[1] for s in sizes)
                if orientation in ROTATING_ORIENTATIONS:
                    need_w, need_h = need_h, need_w
                gray = all(p.channels == 1 for p in preps) and im.mode == "RGB"
                im.draft("L" if gray else im.mode, (need_w, need_h))
            im.load()
            out = upright(eight_bit(im), orientation)
            return [p.from_pil(out) for p in preps]
    except DatasetError:
        raise
    except Exception as e:  # any decoder failure is the file's fault: name it
        raise DatasetError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e


class ImageFolder:
    """One split of a folder dataset (``<split>/<class>/<file>``), held as file names and labels only.

    Nothing is decoded until asked (``views``, or a loader from ``iter_views``), so memory does not grow with
    the number of images: the names sit in one numpy bytes array (no Python object per file, so forked
    loader workers do not copy them page by page through reference counts). Classes are the subfolders in
    sorted order (label = position); files are in sorted order within a class.
    """

    def __init__(self, root: Path, files: np.ndarray, labels: np.ndarray, class_names: list[str]) -> None:
        if files.shape != labels.shape:
            raise DatasetError(f"{files.shape[0]} files for {labels.shape[0]} labels")
        self.root = Path(root)
        self.files = files  # (N,) bytes: UTF-8 paths relative to root
        self.labels = labels.astype(np.int64)  # (N,)
        self.class_names = list(class_names)

    @classmethod
    def scan(cls, root: Path) -> ImageFolder:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not classes:
            raise DatasetError(f"{root} has no class subfolders (expected {root}/<class>/<image files>)")
        files: list[bytes] = []
        labels: list[int] = []
        for label, name in enumerate(classes):
            names = sorted(
                e.name
                for e in os.scandir(root / name)
                if e.is_file() and Path(e.name).suffix.lower() in _IMAGE_SUFFIXES
            )
            files.extend(f"{name}/{n}".encode() for n in names)
            labels.extend([label] * len(names))
        if not files:
            raise DatasetError(f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) under {root}")
        return cls(root, np.array(files, dtype=np.bytes_), np.asarray(labels, np.int64), classes)

    @classmethod
    def scan_unlabeled(cls, root: Path) -> ImageFolder:
        """Every image file below ``root`` (any depth, sorted), with no classes: each label is the file's row
        (0..N-1). Raises ``DatasetError`` when there is none."""
        files = sorted(
            p.relative_to(root).as_posix().encode()
            for p in root.rglob("*")
            if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
        )
        if not files:
            raise DatasetError(f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) under {root}")
        return cls(root, np.array(files, dtype=np.bytes_), np.arange(len(files), dtype=np.int64), [])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def path(self, i: int) -> Path:
        return self.root / self.files[i].decode()

    def _select(self, idx: np.ndarray) -> ImageFolder:
        return ImageFolder(self.root, self.files[idx], self.labels[idx], self.class_names)

    def subset(self, classes: Sequence[int]) -> ImageFolder:
        """The files whose label is in ``classes`` (labels keep their values)."""
        unknown = sorted(set(classes) - set(range(self.num_classes)))
        if unknown:
            raise DatasetError(
                f"classes {unknown} do not exist: {self.root} has classes 0-{self.num_classes - 1}"
            )
        return self._select(np.isin(self.labels, np.asarray(list(classes), dtype=np.int64)))

    def take(self, n: int, seed: int = 0) -> ImageFolder:
        """A seeded random slice of at most ``n`` files (the same draw as ``Dataset.take``)."""
        if n >= len(self):
            return self
        return self._select(np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False)))

    def views(self, i: int, preps: Sequence[Preprocess]) -> list[np.ndarray]:
        """File ``i`` decoded once, as a (C, H, W) uint8 array under each contract."""
        return decode_views(self.path(i), preps)


Split = Dataset | ImageFolder


class _Failure:
    """What a loader worker hands back instead of raising: the main process raises it as one clear line
    (an exception raised in a worker comes back wrapped in the worker's traceback)."""

    def __init__(self, message: str) -> None:
        self.message = message


class _FolderViews(torch.utils.data.Dataset):
    """A torch ``Dataset`` over an ``ImageFolder``: item i is (one uint8 array per contract, label)."""

    def __init__(self, folder: ImageFolder, preps: Sequence[Preprocess]) -> None:
        self.folder, self.preps = folder, list(preps)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        try:
            return self.folder.views(i, self.preps), int(self.folder.labels[i])
        except DatasetError as e:
            return _Failure(str(e))


def _collate(items):
    for item in items:
        if isinstance(item, _Failure):
            return item
    n = len(items[0][0])
    views = tuple(torch.from_numpy(np.stack([it[0][k] for it in items])) for k in range(n))
    return views, torch.tensor([it[1] for it in items], dtype=torch.int64)


def iter_views(
    ds: Split,
    preps: Sequence[Preprocess],
    batch_size: int,
    order: np.ndarray | torch.Tensor | None = None,
    workers: int | None = None,
) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    """Batches of ``ds`` seen through each contract: ((B, C_k, H_k, W_k) uint8 per prep, (B,) labels).

    ``order`` is the item order (None: as stored). Each model sees every image through its own contract,
    from the source image: an in-memory ``Dataset`` is sliced, and converted with ``Preprocess.from_array``
    only for a contract of another shape (none for IDX data under its own shape: as fast as a slice); an
    ``ImageFolder`` is decoded by a torch ``DataLoader`` with ``workers`` processes (None: ``default_workers()``,
    0: in this process), each file once for all contracts. Preps that are equal (or, for in-memory data,
    of the data's own shape) yield the *same* tensor object, so callers can tell a view is shared.
    """
    uniq = list(dict.fromkeys(preps))
    where = [uniq.index(p) for p in preps]
    idx_all = torch.as_tensor(order) if order is not None else torch.arange(len(ds))
    if isinstance(ds, Dataset):
        images, labels = torch.from_numpy(ds.images), torch.from_numpy(ds.labels)
        native = tuple(ds.images.shape[1:])
        for i in range(0, len(ds), batch_size):
            idx = idx_all[i : i + batch_size]
            x = images[idx]
            made = [x if p.shape == native else torch.from_numpy(p.from_array(x.numpy())) for p in uniq]
            yield tuple(made[k] for k in where), labels[idx]
        return
    workers = default_workers() if workers is None else workers
    batches = [idx_all[i : i + batch_size].tolist() for i in range(0, len(ds), batch_size)]
    loader = torch.utils.data.DataLoader(
        _FolderViews(ds, uniq),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_collate,
        prefetch_factor=2 if workers else None,
    )
    for batch in loader:
        if isinstance(batch, _Failure):
            raise DatasetError(batch.message)
        made, labels = batch
        yield tuple(made[k] for k in where), labels


def augment_views(
    views: Sequence[torch.Tensor], generator: torch.Generator, pad: int = 2
) -> tuple[torch.Tensor, ...]:
    """``trainer.preprocess.augment`` applied alike to every view of a batch: the same random horizontal
    flip per image, and the same shift, scaled to each view's size (``pad`` pixels on the first view).
    The random draws are ``augment``'s, so a single view gets exactly what ``augment`` gives it; a view
    object repeated in ``views`` is augmented once."""
    b, _, h0, w0 = views[0].shape
    flip = torch.rand(b, generator=generator) < 0.5
    dy, dx = (int(v) - pad for v in torch.randint(0, 2 * pad + 1, (2,), generator=generator))
    done: dict[int, torch.Tensor] = {}
    out = []
    for v in views:
        if id(v) not in done:
            h, w = v.shape[2:]
            py, px = round(pad * h / h0), round(pad * w / w0)
            sy, sx = round(dy * h / h0), round(dx * w / w0)
            x = torch.where(flip[:, None, None, None], v.flip(3), v)
            padded = F.pad(x, (px, px, py, py))
            done[id(v)] = padded[:, :, py + sy : py + sy + h, px + sx : px + sx + w]
        out.append(done[id(v)])
    return tuple(out)


def load_split(data_dir: str | os.PathLike[str] | None, split: str) -> Split:
    """Load the ``train`` or ``test`` split of a dataset directory.

    The directory holds either IDX files named like Fashion-MNIST's (``train-images-idx3-ubyte[.gz]`` ...),
    read into memory as a ``Dataset``, or ``train/`` and ``test/`` folders with one subfolder of images per
    class, listed (not decoded) as an ``ImageFolder``.
    """
    if split not in _SPLIT_PREFIX:
        raise DatasetError(f"unknown split {split!r}: expected 'train' or 'test'")
    root = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    if not root.is_dir():
        raise DatasetError(f"dataset directory {root} does not exist; {INSTALL_HINT}")
    if (root / split).is_dir():
        return ImageFolder.scan(root / split)
    return _load_idx_split(root, split)
