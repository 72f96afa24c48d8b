"""Real photos at the HTTP door (in-process server, tiny v1): a 12-megapixel JPEG rotated by EXIF finds what
its 28x28 PNG finds; WebP and odd colour modes are accepted; bombs, oversize images and (in strict mode)
wrong sizes are refused naming the setting, and nothing of a refused request is stored."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from service.images import encode_png_base64
from tests.support.payloads import H
from trainer.data import Dataset, DatasetError, load_split, query_gallery_split

N_CLASSES = 10


@pytest.fixture(scope="module")
def fmnist() -> Dataset:
    try:
        ds = load_split(None, "test")
    except DatasetError as e:
        pytest.skip(f"Fashion-MNIST is not installed: {e}")
    assert isinstance(ds, Dataset)
    return ds


@pytest.fixture(scope="module")
def fmnist_v1(tmp_path_factory) -> Path:
    """A models dir holding v1 trained briefly on Fashion-MNIST classes 0-4 (about 10 s on one thread).

    Its card asks for ``box`` (area) resizing: a photo's pixels then average back onto the item's, so what is
    compared is the decode path (EXIF, the JPEG's reduced decode, the crop), not a filter's blur, which a
    briefly trained model is sensitive to (bilinear's antialiasing moves pixels by about 7 grey levels).
    """
    from trainer.train import TrainConfig, train

    models = tmp_path_factory.mktemp("photo-models")
    cfg = TrainConfig(out=str(models / "v1"), classes="0-4", epochs=2, limit=2000, eval_limit=100, threads=1)
    train(cfg)
    card_path = models / "v1" / "card.json"
    card = json.loads(card_path.read_text())
    card["preprocess"]["interpolation"] = "box"
    card_path.write_text(json.dumps(card))
    return models


def queries(ds: Dataset) -> list[int]:
    """The first test item of each class (query split): distinct items a classifier's embedding tells apart."""
    q_idx, _ = query_gallery_split(len(ds))
    return [int(q_idx[ds.labels[q_idx] == c][0]) for c in range(N_CLASSES)]


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def photo(item: np.ndarray, orientation: int = 6, quality: int = 90) -> bytes:
    """A (1, 28, 28) item as a 4032 x 3024 JPEG stored on its side, with EXIF ``orientation`` (6 shows it).

    Shown upright it is 3024 wide x 4032 high: the item upscaled to 3024 x 3024 in the middle, black above
    and below (Fashion-MNIST's background), so the model's fit (shorter side to 28, centre crop) sees the item.
    """
    shown = Image.new("L", (3024, 4032), 0)
    shown.paste(Image.fromarray(item[0]).resize((3024, 3024), Image.Resampling.BICUBIC), (0, 504))
    stored = shown.transpose(Image.Transpose.ROTATE_90)  # orientation 6 turns it back (90 degrees clockwise)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.convert("RGB").save(buf, "JPEG", quality=quality, exif=exif.tobytes())
    raw = buf.getvalue()
    assert stored.size == (4032, 3024)
    if orientation == 6:  # Pillow's own exif_transpose agrees that this file shows an upright portrait
        assert ImageOps.exif_transpose(Image.open(io.BytesIO(raw))).size == (3024, 4032)
    return raw


def encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def server(make_server, fmnist, fmnist_v1):
    """v1 over a gallery of one Fashion-MNIST test item per class (PNGs, ids ``q<index>``), with a pixel
    bound of 1 megapixel for the refusals."""
    s = make_server(GRACEFUL_MODELS_DIR=str(fmnist_v1), GRACEFUL_MAX_IMAGE_PIXELS=str(1 << 20)).start()
    items = [
        {"external_id": f"q{i}", "image_base64": encode_png_base64(fmnist.images[i])} for i in queries(fmnist)
    ]
    r = s.client.post("/v1/items", json={"items": items}, headers=H)
    assert r.status_code == 200, r.text
    return s


def top1(server, raw: bytes) -> tuple[str, float]:
    r = server.client.post("/v1/search", json={"image_base64": b64(raw), "k": 1})
    assert r.status_code == 200, r.text
    hit = r.json()["hits"][0]
    return hit["external_id"], hit["score"]


def total(server) -> int:
    return server.client.get("/v1/backfill/report?candidate=v1").json()["items_total"]


@pytest.mark.slow
def test_rotated_12_megapixel_jpeg_finds_what_its_png_finds(server, fmnist):
    unrotated = 0
    for n, i in enumerate(queries(fmnist)):
        want, png_score = top1(server, encode(fmnist.images[i][0], "PNG"))
        assert want == f"q{i}" and png_score > 0.999  # the PNG finds itself
        got, jpeg_score = top1(server, photo(fmnist.images[i]))
        assert got == want, (i, want, got, png_score, jpeg_score)
        # the test can fail: the same photo without its orientation is a different picture
        if n < 4:
            unrotated += top1(server, photo(fmnist.images[i], orientation=1))[0] != want
    assert unrotated >= 3, unrotated
    # Ingest keeps the photo's own bytes (a backfill re-decodes the original under the next model's contract)
    i = queries(fmnist)[0]
    raw = photo(fmnist.images[i])
    r = server.client.post("/v1/items", files=[("files", ("photo.jpg", raw, "image/jpeg"))], headers=H)
    assert r.status_code == 200, r.text
    assert server.client.get("/v1/items/photo/image").content == raw
    r = server.client.post("/v1/search", json={"image_base64": encode_png_base64(fmnist.images[i]), "k": 2})
    assert {h["external_id"] for h in r.json()["hits"]} == {f"q{i}", "photo"}


@pytest.mark.slow
def test_webp_and_odd_colour_modes_are_accepted(server, fmnist):
    i = queries(fmnist)[1]
    item = fmnist.images[i][0]
    rgba = np.dstack([item, item, item, np.full_like(item, 255)])
    palette = Image.fromarray(item).convert("P")
    sixteen = Image.fromarray(item.astype(np.uint16) * 257)
    cmyk = Image.fromarray(item).convert("RGB").convert("CMYK")
    variants = {
        "webp lossless": encode(item, "WEBP", lossless=True),
        "webp lossy": encode(np.dstack([item] * 3), "WEBP", quality=95),
        "png rgba": encode(rgba, "PNG"),
        "png palette": _save(palette, "PNG"),
        "png 16-bit": _save(sixteen, "PNG"),
        "jpeg cmyk": _save(cmyk, "JPEG", quality=95),
        "png 56x56": _save(Image.fromarray(item).resize((56, 56), Image.Resampling.NEAREST), "PNG"),
    }
    for what, raw in variants.items():
        assert top1(server, raw)[0] == f"q{i}", what
    before = total(server)
    items = [{"external_id": f"w{n}", "image_base64": b64(raw)} for n, raw in enumerate(variants.values())]
    r = server.client.post("/v1/items", json={"items": items}, headers=H)
    assert r.status_code == 200, r.text
    assert total(server) == before + len(items)


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _forged_bomb() -> bytes:
    """A 28x28 PNG whose header says 100000 x 100000 (CRC fixed)."""
    png = bytearray(_save(Image.new("L", (28, 28)), "PNG"))
    png[16:24] = struct.pack(">II", 100_000, 100_000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])) & 0xFFFFFFFF)
    return bytes(png)


@pytest.mark.slow
def test_bombs_and_oversize_images_are_refused_naming_the_setting_and_store_nothing(server):
    before = total(server)
    refused = {
        "bomb": _save(Image.new("L", (8000, 8000)), "PNG"),  # 64 megapixels in about 60 kB
        "forged": _forged_bomb(),
        "oversize": _save(Image.new("RGB", (1100, 1000), (9, 9, 9)), "WEBP"),
        # a JPEG the draft cannot bring under the bound: 1/8 of 12000 x 9000 is 1500 x 1125
        "jpeg": _save(Image.new("L", (12000, 9000), 0), "JPEG"),
    }
    for name, raw in refused.items():
        for r in (
            server.client.post(
                "/v1/items", json={"items": [{"external_id": name, "image_base64": b64(raw)}]}, headers=H
            ),
            server.client.post("/v1/items", files=[("files", (f"{name}.png", raw, "image/png"))], headers=H),
            server.client.post("/v1/search", json={"image_base64": b64(raw), "k": 1}),
        ):
            assert r.status_code == 413, (name, r.status_code, r.text)
            assert "GRACEFUL_MAX_IMAGE_PIXELS=1048576" in r.json()["detail"], (name, r.text)
        assert server.client.get(f"/v1/items/{name}").status_code == 404
    # one refused image fails its whole request: the good one beside it is not stored either
    good = encode_png_base64(np.zeros((1, 28, 28), np.uint8))
    batch = [
        {"external_id": "ok", "image_base64": good},
        {"external_id": "bad", "image_base64": b64(refused["bomb"])},
    ]
    assert server.client.post("/v1/items", json={"items": batch}, headers=H).status_code == 413
    assert server.client.get("/v1/items/ok").status_code == 404
    assert total(server) == before


@pytest.mark.slow
def test_strict_mode_refuses_a_wrong_size_and_other_formats_are_named(make_server, fmnist):
    server = make_server(GRACEFUL_IMAGE_STRICT_SIZE="true").start()  # the tiny v1: 28x28 gray
    item = fmnist.images[0][0]
    ok = encode(item, "PNG")
    r = server.client.post(
        "/v1/items", json={"items": [{"external_id": "a", "image_base64": b64(ok)}]}, headers=H
    )
    assert r.status_code == 200, r.text
    wrong = {
        "big": encode(np.kron(item, np.ones((2, 2), np.uint8)), "PNG"),
        "photo": photo(fmnist.images[0]),
    }
    for name, raw in wrong.items():
        r = server.client.post(
            "/v1/items", json={"items": [{"external_id": name, "image_base64": b64(raw)}]}, headers=H
        )
        assert r.status_code == 422, (name, r.text)
        detail = r.json()["detail"]
        assert "the model expects 28x28" in detail and "GRACEFUL_IMAGE_STRICT_SIZE=true" in detail, detail
        r = server.client.post("/v1/search", json={"image_base64": b64(raw), "k": 1})
        assert r.status_code == 422 and "GRACEFUL_IMAGE_STRICT_SIZE" in r.json()["detail"], r.text
        assert server.client.get(f"/v1/items/{name}").status_code == 404
    gif = _save(Image.fromarray(item), "GIF")
    r = server.client.post("/v1/search", json={"image_base64": b64(gif), "k": 1})
    assert (
        r.status_code == 422 and "GIF images are not accepted (send PNG, JPEG or WebP)" in r.json()["detail"]
    )
