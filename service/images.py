"""Decoding request images into the uint8 arrays a model embeds, refusing anything else with a reason."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np

from service.errors import BadImage, TooLarge

ALLOWED_FORMATS = {"PNG", "JPEG"}


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


def decode_image(raw: bytes, *, channels: int, size: int, max_pixels: int, what: str) -> np.ndarray:
    """PNG/JPEG bytes -> (C, H, W) uint8 in the model's input format.

    The image must already be ``size`` x ``size``: silently resizing would hide a client sending the wrong
    kind of picture. Grayscale models accept colour images (converted to luminance).
    """
    from PIL import Image, UnidentifiedImageError

    if not raw:
        raise BadImage(f"{what}: empty image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(raw))
            if im.format not in ALLOWED_FORMATS:
                raise BadImage(f"{what}: {im.format or 'unknown'} images are not accepted (PNG or JPEG)")
            w, h = im.size
            if w * h > max_pixels:
                raise TooLarge(f"{what}: image of {w}x{h} pixels exceeds the limit of {max_pixels}")
            if (w, h) != (size, size):
                raise BadImage(f"{what}: image is {w}x{h}, the model expects {size}x{size}")
            converted = im.convert("L" if channels == 1 else "RGB")
            arr = np.asarray(converted, dtype=np.uint8)
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombWarning,
        Image.DecompressionBombError,
    ) as e:
        raise BadImage(f"{what}: not a decodable PNG or JPEG image ({type(e).__name__})") from None
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


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
