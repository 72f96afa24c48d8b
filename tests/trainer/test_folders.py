"""Training and evaluating on folders of images of any size and colour, loaded lazily (trainer/data.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from tests.support.photos import write_tiny_photos
from trainer.cli import train_main
from trainer.data import (
    Dataset,
    ImageFolder,
    augment_views,
    decode_views,
    iter_views,
    load_split,
)
from trainer.errors import ConfigError, DatasetError
from trainer.preprocess import Preprocess, augment
from trainer.train import TrainConfig, parse_size, train

RGB32 = Preprocess(channels=3, height=32, width=32, mean=(0.5,) * 3, std=(0.25,) * 3)
GREY28 = Preprocess()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_tiny_photos(tmp_path_factory.mktemp("photos"))


def test_folder_is_listed_not_decoded(photos):
    train = load_split(photos, "train")
    assert isinstance(train, ImageFolder) and len(train) == 40
    assert train.files.dtype.kind == "S"  # names in one bytes array, no decoded pixels
    assert train.labels.tolist() == sorted(train.labels.tolist())
    assert len(train.subset([0, 1])) == 8 and len(train.take(5)) == 5


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_yields_each_contract(photos, workers):
    train = load_split(photos, "train")
    batches = list(iter_views(train, [RGB32, GREY28, RGB32], 16, workers=workers))
    assert [len(y) for _, y in batches] == [16, 16, 8]
    (new, old, same), labels = batches[0]
    assert new.shape == (16, 3, 32, 32) and new.dtype == torch.uint8
    assert old.shape == (16, 1, 28, 28) and old.dtype == torch.uint8
    assert same is new  # equal contracts share one view
    np.testing.assert_array_equal(labels.numpy(), train.labels[:16])
    # each view is the file decoded once through that contract (test_jpeg_decoded_reduced: the decode)
    for i in range(16):
        want_old, want_new = train.views(i, [GREY28, RGB32])
        np.testing.assert_array_equal(old[i].numpy(), want_old)
        np.testing.assert_array_equal(new[i].numpy(), want_new)
        if Image.open(train.path(i)).format == "PNG":  # no reduced decode: exactly from_pil of the file
            np.testing.assert_array_equal(new[i].numpy(), RGB32.from_pil(_upright(train.path(i))))


def _upright(path):
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


def test_exif_orientation_is_applied(photos):
    rows = [r for r in _manifest(photos) if r["orientation"] in ("6", "8", "5", "7")]
    assert rows, "the tiny folder has rotated files"
    for r in rows:
        w, h = int(r["width"]), int(r["height"])
        stretch = Preprocess(channels=3, height=h, width=w, resize="stretch")
        (arr,) = decode_views(photos / r["file"], [stretch])
        with Image.open(photos / r["file"]) as im:
            assert im.size == (h, w)  # stored turned; the view is upright
        assert arr.shape == (3, h, w)


def _manifest(root):
    import csv

    with open(root / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_jpeg_decoded_reduced(tmp_path, monkeypatch):
    from PIL import JpegImagePlugin

    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1200, 1600, 3), dtype=np.uint8))
    big = big.resize((400, 300)).resize((1600, 1200))  # smooth enough that a reduced decode looks the same
    exif = Image.Exif()
    exif[0x0112] = 6
    big.save(tmp_path / "big.jpg", quality=90, exif=exif.tobytes())
    asked = []
    real = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(
        JpegImagePlugin.JpegImageFile,
        "draft",
        lambda self, mode, size: asked.append((mode, size)) or real(self, mode, size),
    )
    (fast,) = decode_views(tmp_path / "big.jpg", [RGB32])
    # stored 1600x1200 turned by orientation 6: upright 1200x1600, fit 32x32 needs 32x43 -> stored 43x32
    assert asked == [("RGB", (43, 32))]
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", lambda self, mode, size: None)
    (full,) = decode_views(tmp_path / "big.jpg", [RGB32])
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 4


def test_corrupt_file_names_the_file(photos, tmp_path, capsys):
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(photos, root)
    bad = root / "train" / "3_c3" / "zz-broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    train = load_split(root, "train")
    for workers in (0, 2):
        with pytest.raises(DatasetError, match=r"cannot decode image .*3_c3/zz-broken\.jpg") as err:
            list(iter_views(train, [RGB32], 8, workers=workers))
        assert "Traceback" not in str(err.value) and "\n" not in str(err.value)
    argv = ["--out", str(tmp_path / "m"), "--data", str(root), "--size", "32", "--epochs", "1"]
    assert train_main([*argv, "--workers", "1", "--threads", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("graceful: error: cannot decode image") and err.count("\n") == 0
    assert "3_c3/zz-broken.jpg" in err


def test_train_on_folder_end_to_end(photos, tmp_path, capsys):
    out = tmp_path / "models" / "p1"
    argv = ["--out", str(out), "--data", str(photos), "--size", "32", "--channels", "3"]
    argv += ["--epochs", "2", "--batch-size", "16", "--threads", "1", "--workers", "1", "--quiet"]
    assert train_main(argv) == 0, capsys.readouterr().err
    card = json.loads((out / "card.json").read_text())
    assert card["preprocess"] == {
        "channels": 3,
        "height": 32,
        "width": 32,
        "resize": "fit",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "interpolation": "bilinear",
    }
    assert card["arch"]["in_channels"] == 3 and card["class_names"][0] == "0_c0"
    assert card["metrics"]["matrix"]["p1/p1"]["n_queries"] == 4  # the 20 test files, every 5th a query


def test_contract_options(photos, tmp_path):
    cfg = TrainConfig(
        out=str(tmp_path / "p2"),
        data=str(photos),
        size="24x32",
        channels=1,
        resize="pad",
        mean=[0.4],
        std=[0.2],
        epochs=1,
        batch_size=20,
        threads=1,
        workers=0,
        augment=False,
    )
    card = train(cfg).card
    assert card.preprocess["height"] == 24 and card.preprocess["width"] == 32
    assert (card.preprocess["channels"], card.preprocess["resize"]) == (1, "pad")
    assert card.preprocess["mean"] == [0.4] and card.arch["in_channels"] == 1


def test_idx_keeps_its_contract_and_speed(tiny_data):
    ds = load_split(tiny_data, "train")
    assert isinstance(ds, Dataset)
    (a, b), _ = next(iter_views(ds, [GREY28, Preprocess(mean=(0.5,), std=(0.5,))], 32))
    assert a is b and a.shape == (32, 1, 28, 28)  # the array itself: no conversion for its own shape
    (rgb,), _ = next(iter_views(ds, [RGB32], 32))
    assert rgb.shape == (32, 3, 32, 32)


def test_augment_views_matches_augment():
    x = torch.randint(0, 255, (8, 1, 28, 28), dtype=torch.uint8)
    y = torch.randint(0, 255, (8, 3, 56, 56), dtype=torch.uint8)
    (one,) = augment_views([x], torch.Generator().manual_seed(3))
    torch.testing.assert_close(one, augment(x, torch.Generator().manual_seed(3)))
    a, b, c = augment_views([x, y, x], torch.Generator().manual_seed(3))
    assert c is a and b.shape == y.shape
    # the same flip on both views: a flipped image's view is flipped too
    flipped = (a == augment(x.flip(3), torch.Generator().manual_seed(3))).all((1, 2, 3))
    assert flipped.any() or (a == augment(x, torch.Generator().manual_seed(3))).all()


@pytest.mark.parametrize(("size", "want"), [("64", (64, 64)), ("48x64", (48, 64)), (32, (32, 32))])
def test_parse_size(size, want):
    assert parse_size(size) == want


@pytest.mark.parametrize("bad", ["0", "x", "64x", "1x2x3", "big"])
def test_parse_size_refuses(bad):
    with pytest.raises(ConfigError, match="--size takes N or HxW"):
        parse_size(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the error cannot happen")
def test_device_cuda_without_cuda(tiny_data, tmp_path, capsys):
    argv = ["--out", str(tmp_path / "m"), "--data", str(tiny_data), "--quiet", "--device"]
    assert train_main([*argv, "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "no CUDA device" in err and "--device cpu" in err
    assert not (tmp_path / "m").exists()
    assert train_main([*argv, "tpu"]) == 2
    assert "--device takes cpu or cuda" in capsys.readouterr().err


def test_transparency_on_black_as_served(tmp_path):
    """The loader decodes as the service does (service/images.py): transparency composited on black."""
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere, opaque only in the middle
    rgba[10:30, 10:30, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    (arr,) = decode_views(tmp_path / "t.png", [Preprocess(channels=3, height=40, width=40)])
    assert arr[:, 0, 0].tolist() == [0, 0, 0] and arr[:, 20, 20].tolist() == [255, 255, 255]
