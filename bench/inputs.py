"""Inputs: what real photos cost and what they change, through the service's own decoder
(``service.images.decode_image``). Writes "## Inputs" to BENCHMARKS.md.

Parts (each can run alone; the section shows every part's latest result, kept under bench/out/inputs/):
- ``decode``: decode + preprocess images/s, one thread, for a 28x28 PNG, a 1000x1000 JPEG and a 4032x3024
  JPEG, into v1's contract (1x28x28) and a 64x64 RGB one, with the JPEG reduced while decoding (Pillow's
  ``draft``) and without, side by side.
- ``retrieval``: the retrieval protocol (2,000 test queries over the 8,000-image gallery, v1 of bench.common's
  pair) with every image sent as the original 28x28 PNG, and sent as a large JPEG photo (the item upscaled
  to 1024 x 1024 on a 1365 x 1024 black canvas, stored in one of the 8 EXIF orientations at random, quality
  90; encoded once, cached under bench/out/inputs/): mAP of each and the difference.

To add a part: a function ``(args) -> str`` (its markdown, machine and command lines included) registered in
``PARTS``; ``--part NAME`` runs only that one.

    .venv/bin/python -m bench.inputs                     # every part, writes the section
    .venv/bin/python -m bench.inputs --part decode       # one part (the others' last results are kept)
    .venv/bin/python -m bench.inputs --quick             # small and fast; prints only
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import time
from collections.abc import Callable

import numpy as np

from bench.common import REPO, command_line, machine_line, v1_v2_models, write_section
from service.images import decode_image, encode_png
from trainer.preprocess import Preprocess

SECTION = "Inputs"
OUT = REPO / "bench" / "out" / "inputs"
PHOTO_SHORT, PHOTO_LONG, PHOTO_QUALITY = 1024, 1365, 90
# The stored pixels of an image shown upright after each EXIF orientation (the inverse of its transpose).
_STORE = {1: None, 2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE"}
_STORE |= {6: "ROTATE_90", 7: "TRANSVERSE", 8: "ROTATE_270"}


def photo_of(item: np.ndarray, canvas: tuple[int, int], side: int, orientation: int, quality: int) -> bytes:
    """A (1, 28, 28) uint8 item as an RGB JPEG photo: shown upright, the item upscaled (bicubic) to ``side`` x
    ``side`` in the middle of a black ``canvas`` (width, height); stored in ``orientation`` with that EXIF tag.

    The item is turned before it is upscaled (a flip or quarter turn commutes with a centred resize), which
    costs nothing at 28x28 instead of turning the whole canvas."""
    from PIL import Image

    small = Image.fromarray(item[0])
    t = _STORE[orientation]
    if t is not None:
        small = small.transpose(getattr(Image.Transpose, t))
    stored_size = canvas if orientation <= 4 else (canvas[1], canvas[0])
    stored = Image.new("L", stored_size, 0)
    up = small.resize((side, side), Image.Resampling.BICUBIC)
    stored.paste(up, ((stored_size[0] - side) // 2, (stored_size[1] - side) // 2))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.convert("RGB").save(buf, "JPEG", quality=quality, exif=exif.tobytes())
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- decode


def _rate(fn: Callable[[], object], min_s: float) -> float:
    """Images/s of ``fn`` (one image a call): the best of 3 runs of at least ``min_s`` seconds each."""
    fn()  # warm
    best = 0.0
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_s:
                break
        best = max(best, n / dt)
    return best


def decode_part(args: argparse.Namespace) -> str:
    from PIL import Image

    from trainer.data import Dataset, load_split

    test = load_split(None, "test")
    assert isinstance(test, Dataset), "the IDX Fashion-MNIST test split"
    item = test.images[0]
    inputs = {
        "28x28 PNG": encode_png(item),
        "1000x1000 JPEG": photo_of(item, (1000, 1000), 1000, 1, PHOTO_QUALITY),
        "4032x3024 JPEG": photo_of(item, (4032, 3024), 3024, 1, PHOTO_QUALITY),
    }
    contracts = {"1x28x28 (v1)": Preprocess(), "3x64x64": Preprocess(channels=3, height=64, width=64)}
    min_s = 0.3 if args.quick else 1.5
    rows: list[tuple[str, int, str, float, float | None, str]] = []
    for name, raw in inputs.items():
        w, h = Image.open(io.BytesIO(raw)).size
        for cname, prep in contracts.items():
            rates: dict[bool, float | None] = {False: None}
            for draft in (True, False) if name.endswith("JPEG") else (True,):  # draft is the JPEG's only

                def one(raw: bytes = raw, prep: Preprocess = prep, draft: bool = draft) -> object:
                    return decode_image(raw, prep=prep, max_pixels=1 << 30, what="bench", draft=draft)

                rates[draft] = _rate(one, min_s)
            im = Image.open(io.BytesIO(raw))
            if im.format == "JPEG":
                im.draft("L" if prep.channels == 1 else "RGB", prep.scaled_size(w, h))
            dw, dh = im.size
            rows.append((name, len(raw), cname, rates[True] or 0.0, rates[False], f"{dw}x{dh}"))
            print(f"{name} -> {cname}: {rates} images/s (draft: True/False)", flush=True)
    lines = [
        "### Decode + preprocess, one thread",
        "",
        "Images/s through `service.images.decode_image` (EXIF, decode, the contract's channels and fit resize),",
        "one image at a time on one thread. The JPEGs are an upscaled Fashion-MNIST item, RGB, quality 90.",
        "",
        "| input | bytes | contract | with draft (images/s) | without draft (images/s) | speed-up | decoded with draft |",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    for name, nbytes, cname, with_d, without_d, decoded in rows:
        if without_d is None:  # a PNG: no reduced decode, one figure
            lines.append(f"| {name} | {nbytes:,} | {cname} | {with_d:,.0f} | (same path) | - | {decoded} |")
        else:
            lines.append(
                f"| {name} | {nbytes:,} | {cname} | {with_d:,.0f} | {without_d:,.0f} | "
                f"{with_d / without_d:.1f}x | {decoded} |"
            )
    lines += ["", machine_line(), f"Command: {command_line()}"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- retrieval


def _photos(images: np.ndarray, seed: int) -> tuple[list[bytes], np.ndarray]:
    """Every image of ``images`` as a photo (see the module doc), with its orientation; cached on disk."""
    key = f"photos-{len(images)}-{PHOTO_LONG}x{PHOTO_SHORT}-q{PHOTO_QUALITY}-seed{seed}"
    blob, index = OUT / f"{key}.bin", OUT / f"{key}.json"
    if blob.exists() and index.exists():
        meta = json.loads(index.read_text())
        data = blob.read_bytes()
        offsets = meta["offsets"]
        return [data[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)], np.array(meta["orient"])
    rng = np.random.default_rng(seed)
    orient = rng.integers(1, 9, len(images))
    t0 = time.perf_counter()
    out = []
    for n, (img, o) in enumerate(zip(images, orient, strict=True)):
        out.append(photo_of(img, (PHOTO_LONG, PHOTO_SHORT), PHOTO_SHORT, int(o), PHOTO_QUALITY))
        if n % 1000 == 999:
            print(f"  encoded {n + 1} photos ({time.perf_counter() - t0:.0f} s)", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in out])]).tolist()
    blob.write_bytes(b"".join(out))
    index.write_text(json.dumps({"offsets": offsets, "orient": orient.tolist()}))
    return out, orient


def retrieval_part(args: argparse.Namespace) -> str:
    import torch

    from trainer.artifact import embed_images, load_model
    from trainer.data import Dataset, load_split, query_gallery_split
    from trainer.metrics import retrieval_metrics

    torch.set_num_threads(1)
    v1 = load_model(v1_v2_models("inputs", args.quick) / "v1")
    prep = v1.preprocess
    test = load_split(None, "test")
    assert isinstance(test, Dataset), "the IDX Fashion-MNIST test split"
    n = 1000 if args.quick else len(test)
    images, labels = test.images[:n], test.labels[:n]
    q_idx, g_idx = query_gallery_split(n)

    t0 = time.perf_counter()
    pngs = [encode_png(img) for img in images]
    photos, orient = _photos(images, seed=0)
    t_encode = time.perf_counter() - t0

    def decode_all(raws: list[bytes], prep: Preprocess) -> tuple[np.ndarray, float]:
        t = time.perf_counter()
        arr = np.stack([decode_image(r, prep=prep, max_pixels=1 << 20, what="bench") for r in raws])
        return arr, time.perf_counter() - t

    as_png, t_png = decode_all(pngs, prep)
    as_photo, t_photo = decode_all(photos, prep)
    pixel_err = float(np.abs(as_photo.astype(np.int16) - images.astype(np.int16)).mean())
    # The same photos resized with area averaging (a card may say interpolation "box"): how much of the gap
    # is the bilinear filter's antialiasing blur.
    as_photo_box, _ = decode_all(photos, dataclasses.replace(prep, interpolation="box"))
    pixel_err_box = float(np.abs(as_photo_box.astype(np.int16) - images.astype(np.int16)).mean())
    emb = {
        "PNG": embed_images(v1, as_png),
        "photo": embed_images(v1, as_photo),
        "photo (box resize)": embed_images(v1, as_photo_box),
    }
    cells = {}
    for qname, gname in (
        ("PNG", "PNG"),
        ("photo", "PNG"),
        ("PNG", "photo"),
        ("photo", "photo"),
        ("photo (box resize)", "PNG"),
        ("photo (box resize)", "photo (box resize)"),
    ):
        cells[(qname, gname)] = retrieval_metrics(
            emb[qname][q_idx], labels[q_idx], emb[gname][g_idx], labels[g_idx]
        )
        c = cells[(qname, gname)]
        print(f"queries {qname} / gallery {gname}: mAP {c['mAP']:.4f} top1 {c['top1']:.4f}", flush=True)
    base = cells[("PNG", "PNG")]["mAP"]
    diff = cells[("photo", "photo")]["mAP"] - base
    diff_box = cells[("photo (box resize)", "photo (box resize)")]["mAP"] - base
    verdict = "within" if abs(diff) <= 0.01 else "**outside**"
    mean_bytes = float(np.mean([len(p) for p in photos]))
    lines = [
        "### Photos versus the original PNGs (retrieval protocol)",
        "",
        f"v1 (bench.common's pair) on the test split: {len(q_idx):,} queries (index % 5 == 0) over the other "
        f"{len(g_idx):,}. Each image is sent once as its 28x28 PNG and once as a photo: upscaled to "
        f"{PHOTO_SHORT}x{PHOTO_SHORT} (bicubic) in the middle of a black {PHOTO_LONG}x{PHOTO_SHORT} canvas, "
        f"RGB, stored in a random one of the 8 EXIF orientations (each about 1/8 of the images), JPEG quality "
        f"{PHOTO_QUALITY}, {mean_bytes / 1024:.0f} KiB on average. Both are decoded by "
        "`service.images.decode_image` into v1's contract (1x28x28, fit, bilinear).",
        "",
        "| queries sent as | gallery sent as | mAP | top-1 | top-5 | mAP - PNG/PNG |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (qname, gname), c in cells.items():
        lines.append(
            f"| {qname} | {gname} | {c['mAP']:.4f} | {c['top1']:.4f} | {c['top5']:.4f} | {c['mAP'] - base:+.4f} |"
        )
    lines += [
        "",
        f"Every image as a photo against every image as a PNG: mAP {diff:+.4f}, {verdict} the aim of 0.01; "
        f"photo queries against the PNG gallery: {cells[('photo', 'PNG')]['mAP'] - base:+.4f}. "
        f"The decoded photos differ from the PNGs by {pixel_err:.1f} grey levels per pixel on average: the "
        "bicubic upscale and the bilinear resize's antialiasing blur the item (orientation and crop land "
        "exactly; tests/service/serving/test_images.py checks every orientation). "
        f"Resized with area averaging instead (`interpolation: box`), the photos differ by {pixel_err_box:.1f} "
        f"grey levels, and mAP by {diff_box:+.4f}. "
        f"Decoding took {t_photo / n * 1e3:.2f} ms per photo (reduced while decoding) and "
        f"{t_png / n * 1e3:.3f} ms per PNG, one thread"
        + (
            f"; encoding the photos once took {t_encode:.0f} s."
            if t_encode > 5
            else " (photos from the cache)."
        ),
        "",
        machine_line(),
        f"Command: {command_line()}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- section

PARTS: dict[str, Callable[[argparse.Namespace], str]] = {
    "decode": decode_part,
    "retrieval": retrieval_part,
}


def render(parts: dict[str, str | None]) -> str:
    body = [
        f"## {SECTION}",
        "",
        "Real photos through the service's own decoder (`service.images.decode_image`): what decoding costs "
        "and what it changes. Each part below was measured by its own run (machine and command under it).",
    ]
    for name, text in parts.items():
        body += ["", text or f"### {name}\n\nNot run yet: `.venv/bin/python -m bench.inputs --part {name}`."]
    return "\n".join(body) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", action="append", choices=list(PARTS), help="run only these parts (repeatable)")
    p.add_argument("--quick", action="store_true", help="small and fast, prints only")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # one thread throughout: the figures are per core
    names = args.part or list(PARTS)
    results: dict[str, str | None] = {}
    for name in PARTS:
        cached = OUT / "parts" / f"{name}.md"
        if name in names:
            print(f"== {name}", flush=True)
            text = PARTS[name](args)
            results[name] = text
            if not args.quick:
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_text(text)
        else:
            results[name] = cached.read_text() if cached.exists() else None
    text = render(results)
    if args.quick:
        print(text)
    else:
        write_section(SECTION, text)
        print(f"wrote ## {SECTION} to BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
