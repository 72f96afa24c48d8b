"""Render Fashion-MNIST (or any IDX dataset of the MNIST family) into a photo-like folder dataset.

    .venv/bin/python scripts/render_photos.py --out photos [--data IDX_DIR] [--limit N] [--seed 0]

SYNTHETIC DATA. Every image it writes is a 28x28 grey Fashion-MNIST item (Xiao, Rasul and Vollgraf, 2017;
MIT licence), upscaled and composited by this script: no photograph is involved. Each item is drawn at a
random canvas size of 64-400 px a side (aspect 3:4 to 4:3), in a random colour tint, on a random textured
background (smooth blotches, stripes or checks, in two random colours, plus sensor-like noise), at a
random place and scale (50-90 % of the shorter side). Most are saved as JPEG (quality 70-95), some as PNG;
some carry an EXIF orientation tag (2-8) with the pixels stored transformed so that applying the tag
(``ImageOps.exif_transpose``) restores the upright picture. ``--mixed-modes`` also saves some as grey and
some as RGBA (for tests of the loaders).

It writes ``OUT/train/<class>/<index>.jpg|png`` and ``OUT/test/<class>/...`` (class folders named
``<label>_<name>``, e.g. ``0_tshirt_top``, so they sort in the source's label order; ``<index>`` is the item's
index in its source split, zero-padded), ``OUT/manifest.csv`` (one row per file: split, file, label, source
index, canvas size, format, EXIF orientation, mode) and ``OUT/README.md`` saying the data is synthetic.
Seeded: item i of a split is drawn from its own generator (seed, split, i), so the output does not depend on
``--workers`` or ``--limit``. ``--limit N`` renders a seeded random N items of each split (all when fewer).
"""

from __future__ import annotations

import argparse
import colorsys
import csv
import io
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "test")
SPLIT_IDS = {"train": 0, "test": 1}
# How the pixels are stored for each EXIF orientation: the inverse of what exif_transpose applies.
STORE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,  # exif_transpose applies ROTATE_270
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,  # exif_transpose applies ROTATE_90
}
SYNTHETIC_NOTE = (
    "This dataset is SYNTHETIC: every image is a 28x28 grey Fashion-MNIST item (Xiao, Rasul and Vollgraf, "
    "2017; MIT licence) upscaled, tinted and composited onto a generated textured background by "
    "scripts/render_photos.py. No photograph is involved; it only looks photo-like (any size, colour, "
    "position, JPEG artefacts, EXIF rotation)."
)


@dataclass(frozen=True)
class RenderOptions:
    min_size: int = 64
    max_size: int = 400
    item_scale: tuple[float, float] = (0.5, 0.9)  # the item's side, as a share of the canvas's shorter side
    png_share: float = 0.15
    exif_share: float = 0.25
    mixed_modes: bool = False  # also grey (1 in 6) and RGBA PNG (1 in 6) files

    def __post_init__(self) -> None:
        if not 8 <= self.min_size <= self.max_size:
            raise ValueError(f"sizes must satisfy 8 <= min <= max, got {self.min_size}, {self.max_size}")


def class_folder_names(class_names: Sequence[str]) -> list[str]:
    """``<label>_<slug>``, the label zero-padded so that the folders sort in label order."""
    width = len(str(len(class_names) - 1))
    out = []
    for i, name in enumerate(class_names):
        slug = re.sub(r"[^a-z0-9]+", "_", name.lower().replace("-", "")).strip("_")
        out.append(f"{i:0{width}d}" + (f"_{slug}" if slug and slug != str(i) else ""))
    return out


_NOISE_SIDE = 512
_noise_bank: list[Image.Image] = []


def _noise(rng: np.random.Generator, w: int, h: int, sigma: float) -> Image.Image:
    """(w, h) grey Gaussian noise of std ``sigma`` around 128: a crop, at a random place, of one fixed seeded
    tile (made once per process), scaled by a lookup table: as random as a picture needs, and cheap."""
    if not _noise_bank:
        tile = np.random.default_rng(12345).standard_normal((_NOISE_SIDE, _NOISE_SIDE), dtype=np.float32)
        _noise_bank.append(Image.fromarray(np.clip(128 + 16 * tile, 0, 255).astype(np.uint8)))
    x, y = int(rng.integers(0, _NOISE_SIDE - w + 1)), int(rng.integers(0, _NOISE_SIDE - h + 1))
    lut = np.clip(np.round(128 + (np.arange(256) - 128) * (sigma / 16)), 0, 255).astype(np.uint8).tolist()
    return _noise_bank[0].crop((x, y, x + w, y + h)).point(lut)


def _texture(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """(w, h) grey pattern: smooth blotches, stripes in a random direction, or checks."""
    kind = rng.integers(3)
    if kind == 0:  # blotches
        gh, gw = (int(v) for v in rng.integers(3, 9, size=2))
        small = Image.fromarray(rng.integers(0, 256, (gh, gw), dtype=np.uint8))
        return small.resize((w, h), Image.Resampling.BICUBIC)
    if kind == 1:  # stripes
        theta, cycles, phase = rng.uniform(0, np.pi), rng.uniform(3, 12), rng.uniform(0, 2 * np.pi)
        k = np.float32(2 * np.pi * cycles / max(w, h))
        u = np.arange(w, dtype=np.float32)[None, :] * (k * np.float32(np.cos(theta)))
        v = np.arange(h, dtype=np.float32)[:, None] * (k * np.float32(np.sin(theta)))
        return Image.fromarray((127.5 + 127.5 * np.sin(u + v + np.float32(phase))).astype(np.uint8))
    cell = int(rng.integers(max(4, min(w, h) // 16), max(5, min(w, h) // 4) + 1))  # checks
    checks = (np.arange(h)[:, None] // cell + np.arange(w)[None, :] // cell) % 2
    return Image.fromarray((checks * 255).astype(np.uint8))


def _colour(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> tuple[int, ...]:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*sat), rng.uniform(*val))
    return (round(r * 255), round(g * 255), round(b * 255))


def render_item(item: np.ndarray, rng: np.random.Generator, opts: RenderOptions) -> Image.Image:
    """A (28, 28) uint8 item -> an upright RGB picture of it (random size, tint, background, place)."""
    from PIL import ImageChops

    w = int(rng.integers(opts.min_size, opts.max_size + 1))
    h = int(
        np.clip(round(w * np.exp(rng.uniform(np.log(0.75), np.log(4 / 3)))), opts.min_size, opts.max_size)
    )
    # two colours of a background, up to 70 levels apart a channel: a pattern, not a second picture
    c1 = _colour(rng, (0.0, 0.8), (0.1, 0.8))
    c2 = tuple(int(np.clip(c + rng.integers(-70, 71), 0, 255)) for c in c1)
    canvas = Image.composite(Image.new("RGB", (w, h), c2), Image.new("RGB", (w, h), c1), _texture(rng, w, h))
    side = max(8, round(min(w, h) * rng.uniform(*opts.item_scale)))
    big = Image.fromarray(np.ascontiguousarray(item)).resize((side, side), Image.Resampling.BICUBIC)
    tint = _colour(rng, (0.2, 1.0), (0.55, 1.0))
    # The item's own shading in the tint (30 % at its darkest), opaque where it has some intensity.
    ramp = 0.3 + 0.7 * np.arange(256) / 255
    shade = Image.merge("RGB", [big.point(np.round(c * ramp).astype(np.uint8).tolist()) for c in tint])
    alpha = big.point(np.minimum(255, 3 * np.arange(256)).tolist())
    x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    canvas.paste(shade, (x0, y0), alpha)
    noise = _noise(rng, w, h, float(rng.uniform(2, 8))).convert("RGB")
    return ImageChops.add(canvas, noise, scale=1.0, offset=-128)


def encode(
    picture: Image.Image, rng: np.random.Generator, opts: RenderOptions
) -> tuple[bytes, str, int, str]:
    """Save ``picture`` as a file's bytes: (bytes, format, EXIF orientation (1 = none), mode)."""
    im, mode = picture, "RGB"
    if opts.mixed_modes:
        pick = rng.integers(6)
        if pick == 0:
            im, mode = picture.convert("L"), "L"
        elif pick == 1:
            im, mode = picture.convert("RGBA"), "RGBA"
    fmt = "PNG" if (mode == "RGBA" or rng.random() < opts.png_share) else "JPEG"
    orientation = int(rng.integers(2, 9)) if rng.random() < opts.exif_share else 1
    kwargs: dict[str, object] = {}
    if orientation != 1:
        im = im.transpose(STORE_FOR_ORIENTATION[orientation])
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    if fmt == "JPEG":
        kwargs["quality"] = int(rng.integers(70, 96))
    else:
        kwargs["compress_level"] = 1  # fast; the files are larger, the pixels the same
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue(), fmt, orientation, mode


def item_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_IDS[split], index])


def _render_one(job: tuple[np.ndarray, int, int, str, str, int, RenderOptions]) -> dict[str, object]:
    item, label, index, split, rel_dir, seed, opts = job
    rng = item_rng(seed, split, index)
    picture = render_item(item, rng, opts)
    data, fmt, orientation, mode = encode(picture, rng, opts)
    rel = f"{split}/{rel_dir}/{index:05d}.{'jpg' if fmt == 'JPEG' else 'png'}"
    return {
        "split": split,
        "file": rel,
        "label": label,
        "index": index,
        "width": picture.width,
        "height": picture.height,
        "format": fmt,
        "orientation": orientation,
        "mode": mode,
        "_bytes": data,
    }


def select(n: int, limit: int | None, seed: int, split: str) -> np.ndarray:
    """Sorted indices of the items of a split of ``n`` to render: a seeded random ``limit`` of them."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, SPLIT_IDS[split], 1 << 20]).choice(n, limit, replace=False))


def render(
    out: Path,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    class_names: Sequence[str],
    *,
    limit: int | None = None,
    seed: int = 0,
    opts: RenderOptions | None = None,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, object]]:
    """Render each split's (images (N, 28, 28) or (N, 1, 28, 28) uint8, labels (N,)) under ``out``; returns
    the manifest rows (also written to ``out/manifest.csv``). ``progress(n)`` is called as files are written."""
    opts = opts or RenderOptions()
    folders = class_folder_names(class_names)
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for split, (images, labels) in splits.items():
        images = images.reshape(len(images), images.shape[-2], images.shape[-1])
        for f in folders:
            (out / split / f).mkdir(parents=True, exist_ok=True)
        for i in select(len(images), limit, seed, split):
            label = int(labels[i])
            jobs.append((images[i], label, int(i), split, folders[label], seed, opts))
    rows: list[dict[str, object]] = []

    def write(row: dict[str, object]) -> None:
        (out / str(row["file"])).write_bytes(row.pop("_bytes"))  # type: ignore[arg-type]
        rows.append(row)
        if progress:
            progress(1)

    if workers > 1:
        from multiprocessing import get_context

        with get_context("fork").Pool(workers) as pool:
            for row in pool.imap(_render_one, jobs, chunksize=64):
                write(row)
    else:
        for job in jobs:
            write(_render_one(job))
    with open(out / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["split", "file"])
        writer.writeheader()
        writer.writerows(rows)
    (out / "README.md").write_text(
        f"# Photo-like Fashion-MNIST (synthetic)\n\n{SYNTHETIC_NOTE}\n\n"
        f"Rendered by `scripts/render_photos.py` (seed {seed}, {len(rows)} files; limit per split: "
        f"{limit if limit is not None else 'none'}). `manifest.csv` maps each file to its item's index in "
        "the source split.\n"
    )
    return rows


def read_manifest(root: Path) -> list[dict[str, str]]:
    with open(Path(root) / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=SYNTHETIC_NOTE)
    p.add_argument("--out", required=True, help="folder to write (train/, test/, manifest.csv, README.md)")
    p.add_argument("--data", default=None, help="IDX dataset folder (default: Debian's Fashion-MNIST)")
    p.add_argument("--limit", type=int, default=None, help="render a seeded random N items of each split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--splits", default="train,test", help="which splits (default train,test)")
    p.add_argument("--min-size", type=int, default=64)
    p.add_argument("--max-size", type=int, default=400)
    p.add_argument("--png-share", type=float, default=0.15)
    p.add_argument("--exif-share", type=float, default=0.25)
    p.add_argument("--mixed-modes", action="store_true", help="also grey and RGBA files")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    from tqdm import tqdm

    from trainer.data import Dataset, load_split
    from trainer.errors import TrainerError

    splits = [s for s in args.splits.split(",") if s]
    if not splits or set(splits) - set(SPLITS):
        p.error(f"--splits takes train and/or test, got {args.splits!r}")
    try:
        data = {s: load_split(args.data, s) for s in splits}
    except TrainerError as e:
        print(f"render_photos: error: {e}", file=sys.stderr)
        return 2
    if not all(isinstance(d, Dataset) and d.images.shape[1:] == (1, 28, 28) for d in data.values()):
        print("render_photos: error: --data must be an IDX dataset of 28x28 grey images", file=sys.stderr)
        return 2
    opts = RenderOptions(
        min_size=args.min_size,
        max_size=args.max_size,
        png_share=args.png_share,
        exif_share=args.exif_share,
        mixed_modes=args.mixed_modes,
    )
    total = sum(len(select(len(d), args.limit, args.seed, s)) for s, d in data.items())
    print(SYNTHETIC_NOTE)
    with tqdm(total=total, desc="render", unit="img", disable=args.quiet, dynamic_ncols=True) as bar:
        rows = render(
            Path(args.out),
            {s: (d.images, d.labels) for s, d in data.items()},
            next(iter(data.values())).class_names,
            limit=args.limit,
            seed=args.seed,
            opts=opts,
            workers=args.workers,
            progress=bar.update,
        )
    print(f"wrote {len(rows)} files under {args.out} (manifest.csv, README.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
