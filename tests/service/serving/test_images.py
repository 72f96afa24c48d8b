"""Decoding request images (service/images.py): formats, EXIF orientation, the JPEG draft and the pixel bound
it counts, bombs, colour modes, strict mode. Every refusal names the setting that changes it."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from service.errors import BadImage, TooLarge
from service.images import PIXELS_SETTING, STRICT_SETTING, decode_image
from service.settings import Settings
from trainer.preprocess import Preprocess

GRAY = Preprocess()  # today's contract: 1 x 28 x 28, fit
BIG = 10**8


def enc(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def exif(orientation: int) -> bytes:
    ex = Image.Exif()
    ex[0x0112] = orientation
    return ex.tobytes()


def blocks(w: int = 8, h: int = 6, seed: int = 0) -> np.ndarray:
    """(h, w) uint8 of very different values: any rotation or flip of it is a different array."""
    return (np.random.default_rng(seed).permutation(w * h).reshape(h, w) * (255 // (w * h))).astype(np.uint8)


# The stored pixels of an image shown upright after each EXIF orientation (the inverse of its transpose).
STORE = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def stored(shown: Image.Image, orientation: int) -> Image.Image:
    t = STORE[orientation]
    return shown if t is None else shown.transpose(t)


def test_setting_names_in_messages_are_the_settings():
    fields = Settings.model_fields
    prefix = Settings.model_config["env_prefix"]
    assert prefix + "MAX_IMAGE_PIXELS" == PIXELS_SETTING and "max_image_pixels" in fields
    assert prefix + "IMAGE_STRICT_SIZE" == STRICT_SETTING and "image_strict_size" in fields
    assert Settings().image_strict_size is False  # resizing is the default


def test_png_of_the_contract_size_round_trips_exactly():
    arr = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    out = decode_image(enc(Image.fromarray(arr), "PNG"), prep=GRAY, max_pixels=BIG, what="x")
    assert out.shape == (1, 28, 28) and out.dtype == np.uint8 and out.flags.writeable
    np.testing.assert_array_equal(out[0], arr)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_exif_orientation_is_applied(orientation, fmt):
    shown = Image.fromarray(np.kron(blocks(), np.ones((16, 16), np.uint8)))  # 128 x 96, 16-px blocks
    raw = enc(
        stored(shown, orientation), fmt, exif=exif(orientation), **({"quality": 95} if fmt == "JPEG" else {})
    )
    # Pillow's own exif_transpose agrees that this file shows ``shown``
    assert ImageOps.exif_transpose(Image.open(io.BytesIO(raw))).size == shown.size
    prep = Preprocess(height=24, width=32, resize="stretch", interpolation="box")
    out = decode_image(raw, prep=prep, max_pixels=BIG, what="x")[0].astype(int)
    upright = prep.from_pil(shown)[0].astype(int)
    err = np.abs(out - upright).max()
    assert err <= (0 if fmt == "PNG" else 12), (orientation, fmt, err)
    # not upright would be far off: every transpose of the blocks moves most of them
    for t in Image.Transpose:
        if shown.size == shown.transpose(t).size:
            assert np.abs(prep.from_pil(shown.transpose(t))[0].astype(int) - upright).mean() > 20


def test_broken_exif_does_not_refuse_the_photo():
    arr = blocks()
    raw = enc(Image.fromarray(arr), "JPEG", quality=95, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff")
    out = decode_image(raw, prep=Preprocess(height=6, width=8), max_pixels=BIG, what="x")
    assert np.abs(out[0].astype(int) - arr).max() <= 12


def test_jpeg_is_reduced_while_decoding_and_the_bound_counts_the_reduced_pixels():
    photo = enc(Image.new("L", (4032, 3024), 128), "JPEG")
    # 4032 x 3024 for a 28x28 fit decodes at 1/8: 504 x 378 = 190,512 pixels
    out = decode_image(photo, prep=GRAY, max_pixels=200_000, what="x")
    assert out.shape == (1, 28, 28) and abs(int(out.mean()) - 128) <= 1
    with pytest.raises(TooLarge, match=f"decoded at 504x378.*{PIXELS_SETTING}=100000"):
        decode_image(photo, prep=GRAY, max_pixels=100_000, what="x")
    # without the draft the whole 12 megapixels are decoded, and counted
    with pytest.raises(TooLarge, match=f"12192768 pixels exceeds {PIXELS_SETTING}=200000"):
        decode_image(photo, prep=GRAY, max_pixels=200_000, what="x", draft=False)
    # a contract that needs more pixels gets them: 512 x 512 fit of 4032 x 3024 decodes at 1/4 (1008 x 756)
    with pytest.raises(TooLarge, match="decoded at 1008x756"):
        decode_image(photo, prep=Preprocess(height=512, width=512), max_pixels=200_000, what="x")


def test_draft_is_asked_in_the_stored_frame_of_a_rotated_photo():
    # stored 4000 wide x 1000 high, orientation 6: shown 1000 x 4000. A 100x100 fit needs 100 x 400 shown,
    # that is 400 x 100 stored: 1/8 (500 x 125). Asked in the shown frame it would get 1/2 (2000 x 500).
    shown = Image.new("L", (1000, 4000), 50)
    raw = enc(stored(shown, 6), "JPEG", exif=exif(6))
    out = decode_image(raw, prep=Preprocess(height=100, width=100), max_pixels=500 * 125, what="x")
    assert out.shape == (1, 100, 100)


def test_non_jpeg_counts_its_header_size_and_bombs_are_refused_before_decoding():
    bomb = enc(Image.new("L", (6000, 6000)), "PNG")  # 36 megapixels in about 35 kB
    assert len(bomb) < 100_000
    with pytest.raises(TooLarge, match=f"6000x6000 = 36000000 pixels exceeds {PIXELS_SETTING}=1048576"):
        decode_image(bomb, prep=GRAY, max_pixels=1 << 20, what="x")
    # a header that declares 100000 x 100000 over a few bytes of pixels: refused from the header alone
    forged = forge_png_size(enc(Image.new("L", (28, 28)), "PNG"), 100_000, 100_000)
    with pytest.raises(TooLarge, match=f"decompression bomb.*{PIXELS_SETTING}"):
        decode_image(forged, prep=GRAY, max_pixels=1 << 20, what="x")
    with pytest.raises(TooLarge, match=f"decompression bomb.*{PIXELS_SETTING}"):
        decode_image(forged, prep=GRAY, max_pixels=1 << 40, what="x")  # whatever the setting allows
    webp = enc(Image.new("RGB", (2000, 2000)), "WEBP")
    with pytest.raises(TooLarge, match=PIXELS_SETTING):
        decode_image(webp, prep=GRAY, max_pixels=1 << 20, what="x")


def forge_png_size(png: bytes, w: int, h: int) -> bytes:
    """``png`` with its IHDR saying ``w`` x ``h`` (CRC fixed): a decompression bomb in a few bytes."""
    ihdr = bytearray(png[8:33])
    ihdr[8:16] = struct.pack(">II", w, h)
    ihdr[21:25] = struct.pack(">I", zlib.crc32(bytes(ihdr[4:21])) & 0xFFFFFFFF)
    return png[:8] + bytes(ihdr) + png[33:]


@pytest.mark.parametrize(
    "raw, words",
    [
        (enc(Image.new("L", (28, 28)), "GIF"), "GIF images are not accepted"),
        (enc(Image.new("L", (28, 28)), "BMP"), "BMP images are not accepted"),
        (enc(Image.new("L", (28, 28)), "TIFF"), "TIFF images are not accepted"),
        (b"\x00\x00\x00\x1cftypheic" + b"\x00" * 40, "HEIC images are not accepted"),
        (b"junk", "not a decodable"),
        (b"", "empty image"),
        (enc(Image.new("L", (28, 28)), "PNG")[:45], "not a decodable"),
        (enc(Image.new("L", (64, 64), 9), "JPEG")[:300], "not a decodable"),
    ],
)
def test_other_formats_and_broken_files_are_refused_naming_what_is_accepted(raw, words):
    with pytest.raises(BadImage, match=words) as e:
        decode_image(raw, prep=GRAY, max_pixels=BIG, what="item 'a'")
    assert "item 'a'" in str(e.value)
    if "not accepted" in words or "decodable" in words:
        assert "PNG, JPEG or WebP" in str(e.value)


def test_webp_lossless_round_trips():
    arr = np.random.default_rng(3).integers(0, 256, (28, 28), dtype=np.uint8)
    raw = enc(Image.fromarray(arr).convert("RGB"), "WEBP", lossless=True)
    np.testing.assert_array_equal(decode_image(raw, prep=GRAY, max_pixels=BIG, what="x")[0], arr)


def test_colour_modes_decode_sanely():
    rgb = Preprocess(channels=3, height=4, width=4, interpolation="nearest")
    # transparency composites on black (the pad colour), whatever colour hides under alpha 0
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:2, :, 3] = 255  # top half opaque white, bottom half transparent white
    out = decode_image(enc(Image.fromarray(rgba, "RGBA"), "PNG"), prep=rgb, max_pixels=BIG, what="x")
    assert (out[:, :2] == 255).all() and (out[:, 2:] == 0).all()
    la = Image.fromarray(rgba, "RGBA").convert("LA")
    out = decode_image(enc(la, "PNG"), prep=GRAY.__class__(height=4, width=4), max_pixels=BIG, what="x")
    assert (out[0, :2] == 255).all() and (out[0, 2:] == 0).all()
    # palette, with and without a transparent entry
    pal = Image.fromarray(np.array([[0, 1], [2, 3]], np.uint8), "P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 12))
    out = decode_image(enc(pal, "PNG"), prep=rgb, max_pixels=BIG, what="x")
    assert tuple(out[:, 0, 2]) == (255, 0, 0) and tuple(out[:, 3, 3]) == (0, 0, 255)
    out = decode_image(enc(pal, "PNG", transparency=1), prep=rgb, max_pixels=BIG, what="x")
    assert tuple(out[:, 0, 2]) == (0, 0, 0) and tuple(out[:, 3, 3]) == (0, 0, 255)
    # 16-bit gray: scaled to 8 bits (Pillow's own conversion would clip everything above 255 to white)
    ramp = np.arange(0, 256, 16, dtype=np.uint16).reshape(4, 4)
    sixteen = Image.fromarray(ramp * 257)
    assert sixteen.mode.startswith("I;16")
    out = decode_image(enc(sixteen, "PNG"), prep=Preprocess(height=4, width=4), max_pixels=BIG, what="x")
    np.testing.assert_array_equal(out[0], ramp)
    # 1-bit
    bits = Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).convert("1")
    out = decode_image(enc(bits, "PNG"), prep=Preprocess(height=2, width=2), max_pixels=BIG, what="x")
    np.testing.assert_array_equal(out[0], [[0, 255], [255, 0]])
    # CMYK JPEG: pure red ink-free cyan-free... red is (C, M, Y, K) = (0, 255, 255, 0)
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    out = decode_image(enc(cmyk, "JPEG", quality=95), prep=rgb, max_pixels=BIG, what="x")
    assert out[0].min() > 230 and out[1].max() < 25 and out[2].max() < 25
    # a colour image into a gray contract: its luminance
    out = decode_image(
        enc(Image.new("RGB", (28, 28), (0, 255, 0)), "PNG"), prep=GRAY, max_pixels=BIG, what="x"
    )
    assert abs(int(out[0, 0, 0]) - 150) <= 1


def test_animated_images_give_their_first_frame():
    frames = [Image.new("L", (28, 28), v) for v in (40, 200)]
    for fmt, kw in (("PNG", {}), ("WEBP", {"lossless": True})):
        raw = enc(frames[0], fmt, save_all=True, append_images=frames[1:], **kw)
        out = decode_image(raw, prep=GRAY, max_pixels=BIG, what="x")
        assert abs(int(out.mean()) - 40) <= 1, fmt


def test_any_size_is_resized_by_the_contract_unless_strict():
    wide = Image.new("L", (56, 28), 0)
    wide.paste(255, (14, 0, 42, 28))  # a white square in the middle
    raw = enc(wide, "PNG")
    out = decode_image(raw, prep=GRAY, max_pixels=BIG, what="x")
    assert (out == 255).all()  # fit: the centre crop
    with pytest.raises(BadImage, match=f"56x28, the model expects 28x28.*{STRICT_SETTING}=true"):
        decode_image(raw, prep=GRAY, max_pixels=BIG, strict=True, what="x")
    ok = enc(Image.new("L", (28, 28)), "PNG")
    assert decode_image(ok, prep=GRAY, max_pixels=BIG, strict=True, what="x").shape == (1, 28, 28)
    # strict compares the shown size: stored 40 x 20 with orientation 6 is 20 wide, 40 high
    tall = Preprocess(height=40, width=20)
    rotated = enc(Image.new("L", (40, 20)), "PNG", exif=exif(6))
    assert decode_image(rotated, prep=tall, max_pixels=BIG, strict=True, what="x").shape == (1, 40, 20)
    with pytest.raises(BadImage, match="20x40, the model expects 40x20"):
        decode_image(rotated, prep=Preprocess(height=20, width=40), max_pixels=BIG, strict=True, what="x")
