"""A model's input contract (stored in its card), turning images of any size into the uint8 arrays it takes,
normalising them, and the augmentation used in training."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from trainer.errors import ConfigError

if TYPE_CHECKING:
    from PIL import Image

RESIZE_POLICIES = ("fit", "pad", "stretch")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box")
# Fashion-MNIST's pixel statistics: the contract of every card written before the contract had more fields.
LEGACY_MEAN, LEGACY_STD = 0.2860, 0.3530


def _per_channel(value: Any, channels: int, what: str) -> tuple[float, ...]:
    vals = [float(v) for v in value] if isinstance(value, list | tuple) else [float(value)]
    if len(vals) == 1:
        vals = vals * channels
    if len(vals) != channels:
        raise ConfigError(f"preprocess {what} has {len(vals)} values for {channels} channels")
    if what == "std" and min(vals) <= 0:
        raise ConfigError(f"preprocess std must be > 0, got {vals}")
    return tuple(vals)


@dataclass(frozen=True)
class Preprocess:
    """Input contract of a model, stored in its card.

    ``channels`` 1 (luminance) or 3 (RGB); ``height`` x ``width`` pixels; ``resize`` how an image of
    another size gets there: ``fit`` (shorter side to the size, then centre crop), ``pad`` (longer side to
    the size, centred on black) or ``stretch`` (both sides, aspect ignored); per-channel ``mean`` and ``std``
    of pixel values in [0, 1]; ``interpolation`` of the resize (a Pillow filter name).
    """

    channels: int = 1
    height: int = 28
    width: int = 28
    resize: str = "fit"
    mean: tuple[float, ...] = field(default=(LEGACY_MEAN,))
    std: tuple[float, ...] = field(default=(LEGACY_STD,))
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ConfigError(f"preprocess channels must be 1 or 3, got {self.channels}")
        if not (1 <= self.height <= 4096 and 1 <= self.width <= 4096):
            raise ConfigError(f"preprocess size must be 1-4096 pixels, got {self.height}x{self.width}")
        if self.resize not in RESIZE_POLICIES:
            raise ConfigError(
                f"preprocess resize must be one of {', '.join(RESIZE_POLICIES)}, got {self.resize!r}"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"preprocess interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        object.__setattr__(self, "mean", _per_channel(self.mean, self.channels, "mean"))
        object.__setattr__(self, "std", _per_channel(self.std, self.channels, "std"))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the arrays this contract produces."""
        return (self.channels, self.height, self.width)

    @property
    def size(self) -> int:
        """The side of a square contract (older code and cards speak of one size)."""
        if self.height != self.width:
            raise ConfigError(f"input is {self.height}x{self.width}, not square: use height and width")
        return self.height

    def to_dict(self) -> dict[str, Any]:
        return {
            "channels": self.channels,
            "height": self.height,
            "width": self.width,
            "resize": self.resize,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        """Read a card's ``preprocess``; a card written before height/width (``size``, scalar mean/std)
        keeps its contract."""
        known = {k: d[k] for k in ("channels", "resize", "mean", "std", "interpolation") if k in d}
        size = d.get("size")
        height, width = d.get("height", size), d.get("width", size)
        if height is not None:
            known["height"] = int(height)
        if width is not None:
            known["width"] = int(width)
        return cls(**known)

    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 -> (B, C, H, W) float32, normalised per channel."""
        x = torch.as_tensor(images).float() / 255.0
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    # ---- any image -> this contract ----------------------------------------------------------------------

    def scaled_size(self, w: int, h: int) -> tuple[int, int]:
        """(width, height) an image of ``w`` x ``h`` is resized to before the crop (fit) or the pad (pad).

        Decoders use it to ask for a reduced decode (JPEG draft) no smaller than this."""
        if self.resize == "stretch":
            return (self.width, self.height)
        ratio = (max if self.resize == "fit" else min)(self.width / w, self.height / h)
        # fit must cover the target and pad must fit in it, whatever the rounding; the tolerance goes the
        # way that keeps an exact side exact (the side the ratio came from lands on the target, not 1 short)
        rnd, eps = (math.ceil, -1e-9) if self.resize == "fit" else (math.floor, 1e-9)
        sw, sh = max(1, rnd(w * ratio + eps)), max(1, rnd(h * ratio + eps))
        if self.resize == "fit":
            sw, sh = max(sw, self.width), max(sh, self.height)
        else:
            sw, sh = min(sw, self.width), min(sh, self.height)
        return (sw, sh)

    def from_pil(self, im: Image.Image) -> np.ndarray:
        """A decoded Pillow image of any size and mode -> (C, H, W) uint8 under this contract.

        Orientation (EXIF) is the decoder's business; this converts channels (luminance for 1) and resizes by
        the policy. An image already of the contract's size is only converted.
        """
        from PIL import Image

        im = im.convert("L" if self.channels == 1 else "RGB")
        if im.size != (self.width, self.height):
            resample = getattr(Image.Resampling, self.interpolation.upper())
            # reducing_gap: Pillow first shrinks by an integer factor (cheap box filter), then resamples;
            # within 1e-2 of the exact filter for factors this large, several times faster.
            if self.resize == "fit":
                # Crop and resize in one step from the exact (sub-pixel) centre region of the target's aspect:
                # resizing to a rounded size first, then cropping, would stretch one axis by up to a pixel.
                w, h = im.size
                scale = max(self.width / w, self.height / h)
                cw, ch = self.width / scale, self.height / scale
                # clamped: in floating point cw or ch can come out a hair over the side (Pillow refuses the box)
                box = (
                    max(0.0, (w - cw) / 2),
                    max(0.0, (h - ch) / 2),
                    min(w, (w + cw) / 2),
                    min(h, (h + ch) / 2),
                )
                im = im.resize((self.width, self.height), resample, box=box, reducing_gap=3.0)
                sw, sh = self.width, self.height
            else:
                sw, sh = self.scaled_size(*im.size)
                im = im.resize((sw, sh), resample, reducing_gap=3.0)
            if self.resize == "pad":
                canvas = Image.new(im.mode, (self.width, self.height), 0)
                canvas.paste(im, ((self.width - sw) // 2, (self.height - sh) // 2))
                im = canvas
        arr = np.asarray(im, dtype=np.uint8)
        return arr[None].copy() if self.channels == 1 else arr.transpose(2, 0, 1).copy()

    def from_array(self, images: np.ndarray) -> np.ndarray:
        """(B, C, H, W) uint8 of another contract -> (B, C', H', W') uint8 of this one (same images).

        How a model with one contract sees images prepared for another: each through its own preprocessing.
        Identity when the shapes already match."""
        if images.shape[1:] == self.shape:
            return images
        from PIL import Image

        out = np.empty((len(images), *self.shape), np.uint8)
        for i, img in enumerate(images):
            mode_arr = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
            out[i] = self.from_pil(Image.fromarray(np.ascontiguousarray(mode_arr)))
        return out


# ---- a decoded picture, before the contract: shared by the service's decoder and the folder loader -----------

EXIF_ORIENTATION_TAG = 0x0112
ROTATING_ORIENTATIONS = (5, 6, 7, 8)  # stored on its side: width and height trade places when shown
# EXIF orientation -> the transpose that shows the picture upright (as PIL.ImageOps.exif_transpose does).
_UPRIGHT = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270"}
_UPRIGHT |= {7: "TRANSVERSE", 8: "ROTATE_90"}


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation (1-8; 1 when absent or unreadable: a broken EXIF block does not lose a picture)."""
    try:
        value = int(im.getexif().get(EXIF_ORIENTATION_TAG, 1))
    except Exception:  # Pillow raises many types on malformed EXIF; the pixels may still be fine
        return 1
    return value if value in _UPRIGHT else 1


def upright(im: Image.Image, orientation: int) -> Image.Image:
    """``im`` turned as its EXIF ``orientation`` says it is shown (``exif_transpose`` on a decoded image)."""
    from PIL import Image

    if orientation not in _UPRIGHT:
        return im
    return im.transpose(getattr(Image.Transpose, _UPRIGHT[orientation]))


def eight_bit(im: Image.Image) -> Image.Image:
    """Any decoded mode -> one that converts to L or RGB faithfully: transparency composited on black (the
    ``pad`` colour), 16/32-bit integer images scaled to 8 bits (Pillow's own conversion clips them at 255)."""
    from PIL import Image

    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(im).astype(np.int64)
        return Image.fromarray(np.clip(arr >> 8, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        im.mode in ("P", "L", "RGB") and "transparency" in im.info
    ):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (0, 0, 0))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random horizontal flip and random shift by up to ``pad`` pixels, batch-wise. (B, C, H, W) -> same."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad))
    # One shift per batch keeps this a cheap slice; batches are shuffled, so every image sees many shifts.
    dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=generator))
    return padded[:, :, dy : dy + h, dx : dx + w]
