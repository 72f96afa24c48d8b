"""Decoding request images into the uint8 arrays a model embeds, refusing anything else with a reason.

PNG, JPEG and WebP of any size up to the pixel bound are accepted: the EXIF orientation is applied, a JPEG is
reduced while it is decoded (libjpeg's DCT scaling through Pillow's ``draft``: a 12-megapixel photo for a 28x28
model decodes at 1/8 of its size), transparency is composited on black (the pad colour of the ``pad`` policy),
16-bit images are brought to 8 bits, and the model's contract (:class:`trainer.Preprocess`) converts the
channels and resizes by its policy. Every refusal names the limit and the setting that changes it.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import TYPE_CHECKING

import numpy as np

from service.errors import BadImage, TooLarge

if TYPE_CHECKING:
    from PIL import Image

    from trainer import Preprocess

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
ACCEPTED = "PNG, JPEG or WebP"
_JPEG_FORMATS = ("JPEG", "MPO")  # MPO: a JPEG with extra frames (depth maps, previews), as some phones write
# Names of the settings a refusal points to (service/settings.py; tests check they match).
PIXELS_SETTING = "GRACEFUL_MAX_IMAGE_PIXELS"
STRICT_SETTING = "GRACEFUL_IMAGE_STRICT_SIZE"
# Formats people send that are not accepted, by their leading bytes: named in the refusal.
_MAGIC = (
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"),
    (b"\x00\x00\x01\x00", "ICO"),
)


def decode_base64(data: str, what: str) -> bytes:
    """Strict base64 (an optional ``data:image/...;base64,`` prefix is accepted)."""
    if not isinstance(data, str) or not data:
        raise BadImage(f"{what}: image_base64 is empty")
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadImage(f"{what}: image_base64 is not valid base64") from None


def _sniff(raw: bytes) -> str | None:
    for magic, name in _MAGIC:
        if raw.startswith(magic):
            return name
    if raw[4:8] == b"ftyp":
        brand = raw[8:12].decode("ascii", "replace").strip().upper()
        return (
            "AVIF" if brand.startswith("AVI") else "HEIC" if brand.startswith(("HEI", "HEV", "MIF")) else None
        )
    if raw.lstrip()[:5].lower() in (b"<?xml", b"<svg "):
        return "SVG"
    return None


def decode_image(
    raw: bytes,
    *,
    prep: Preprocess,
    max_pixels: int,
    strict: bool = False,
    what: str,
    draft: bool = True,
) -> np.ndarray:
    """PNG/JPEG/WebP bytes -> (C, H, W) uint8 under the model's contract ``prep``.

    ``max_pixels`` bounds the pixels actually decoded (a JPEG's after its reduced decode, any other format's
    header size); ``strict`` refuses an image that is not already ``prep``'s size, as the service did before
    it resized (``GRACEFUL_IMAGE_STRICT_SIZE``). ``draft=False`` decodes a JPEG at full size (benchmarks).
    Raises :class:`BadImage` (not decodable, not accepted, wrong size in strict mode) or :class:`TooLarge`.
    """
    from PIL import Image, UnidentifiedImageError

    if not raw:
        raise BadImage(f"{what}: empty image")
    bound = f"{PIXELS_SETTING}={max_pixels}"
    try:
        im = Image.open(io.BytesIO(raw), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as e:  # Pillow's own bound (2x Image.MAX_IMAGE_PIXELS)
        raise TooLarge(
            f"{what}: refused as a decompression bomb ({e}); images are bounded by {bound}"
        ) from None
    except UnidentifiedImageError:
        name = _sniff(raw)
        if name:
            raise BadImage(f"{what}: {name} images are not accepted (send {ACCEPTED})") from None
        raise BadImage(f"{what}: not a decodable {ACCEPTED} image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"{what}: not a decodable {ACCEPTED} image ({type(e).__name__})") from None
    try:
        return _decode_opened(im, prep=prep, max_pixels=max_pixels, strict=strict, what=what, draft=draft)
    except (TooLarge, BadImage):
        raise
    except Image.DecompressionBombError as e:
        raise TooLarge(
            f"{what}: refused as a decompression bomb ({e}); images are bounded by {bound}"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, KeyError) as e:
        raise BadImage(f"{what}: not a decodable {ACCEPTED} image ({type(e).__name__}: {e})") from None
    finally:
        im.close()


def _check_pixels(w: int, h: int, dw: int, dh: int, max_pixels: int, what: str) -> None:
    """Refuse an image of ``w`` x ``h`` that would decode to ``dw`` x ``dh`` pixels, over the bound."""
    if dw * dh > max_pixels:
        reduced = f" (decoded at {dw}x{dh})" if (dw, dh) != (w, h) else ""
        raise TooLarge(
            f"{what}: image of {w}x{h}{reduced} = {dw * dh} pixels exceeds {PIXELS_SETTING}={max_pixels}; "
            "raise the setting to accept larger images"
        )


def _decode_opened(
    im: Image.Image, *, prep: Preprocess, max_pixels: int, strict: bool, what: str, draft: bool
) -> np.ndarray:
    from PIL import Image

    from trainer import ROTATING_ORIENTATIONS, eight_bit, exif_orientation, upright

    w, h = im.size
    if w < 1 or h < 1:
        raise BadImage(f"{what}: image of {w}x{h} pixels has no pixels")
    bound = f"{PIXELS_SETTING}={max_pixels}"
    # Pillow's bomb bound on what the header declares, checked here rather than through its warning
    # (warnings filters are process-wide, not per thread): no draft can make such a file reasonable.
    if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
        raise TooLarge(
            f"{what}: image declares {w}x{h} pixels, over the decompression-bomb bound of "
            f"{Image.MAX_IMAGE_PIXELS}; images are bounded by {bound}"
        )
    jpeg = draft and im.format in _JPEG_FORMATS
    if not jpeg:  # before the EXIF is read: a PNG's may follow its pixels, and reading it decodes them
        _check_pixels(w, h, w, h, max_pixels, what)
    orientation = exif_orientation(im)
    swapped = orientation in ROTATING_ORIENTATIONS  # width and height trade places when shown
    shown = (h, w) if swapped else (w, h)
    if strict and shown != (prep.width, prep.height):
        raise BadImage(
            f"{what}: image is {shown[0]}x{shown[1]}, the model expects {prep.width}x{prep.height} "
            f"(strict size: {STRICT_SETTING}=true; set it to false to resize by the model's contract)"
        )
    if jpeg:
        # Ask libjpeg for no less than the resize needs, in the stored (pre-rotation) frame; it picks the
        # largest 1/1, 1/2, 1/4 or 1/8 scale that still covers it.
        need_w, need_h = prep.scaled_size(*shown)
        im.draft("L" if prep.channels == 1 else "RGB", (need_h, need_w) if swapped else (need_w, need_h))
        _check_pixels(w, h, *im.size, max_pixels, what)  # what will be decoded
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)  # animated PNG/WebP, MPO: the first frame is the picture
    im.load()
    return prep.from_pil(upright(eight_bit(im), orientation))


def encode_png(image: np.ndarray) -> bytes:
    """(C, H, W) or (H, W) uint8 -> PNG bytes (clients, tests and the demo use it)."""
    from PIL import Image

    arr = image[0] if image.ndim == 3 and image.shape[0] == 1 else image
    if arr.ndim == 3:
        arr = arr.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def encode_png_base64(image: np.ndarray) -> str:
    return base64.b64encode(encode_png(image)).decode("ascii")
