from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from trainer.data import Dataset, load_split, parse_classes, query_gallery_split, read_idx
from trainer.errors import DatasetError
from trainer.preprocess import Preprocess


def _idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def test_read_idx_plain_and_gzip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(_idx_bytes(arr))
    with gzip.open(tmp_path / "b.gz", "wb") as f:
        f.write(_idx_bytes(arr))
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "b.gz"), arr)


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\x00\x00\x08", "bad magic"),
        (b"PK\x03\x04abcdefgh", "bad magic"),
        (bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"abc", "truncated"),
    ],
)
def test_read_idx_refuses_malformed(tmp_path, payload, message):
    (tmp_path / "x").write_bytes(payload)
    with pytest.raises(DatasetError, match=message):
        read_idx(tmp_path / "x")


def test_load_split_tiny(tiny_data):
    train, test = load_split(tiny_data, "train"), load_split(tiny_data, "test")
    assert train.images.shape == (400, 1, 28, 28) and train.images.dtype == np.uint8
    assert test.images.shape == (200, 1, 28, 28)
    assert sorted(set(train.labels.tolist())) == list(range(10))


def test_missing_dataset_says_how_to_install(tmp_path):
    with pytest.raises(DatasetError, match="apt-get install -y dataset-fashion-mnist"):
        load_split(tmp_path / "nope", "train")
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte"):
        load_split(tmp_path, "train")


def test_image_folders(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(d / f"{i}.png")
    ds = load_split(tmp_path, "train")  # listed, not decoded (trainer/data.py ImageFolder)
    assert len(ds) == 6 and ds.views(0, [Preprocess()])[0].shape == (1, 28, 28)
    assert ds.class_names == ["cat", "dog"] and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    (tmp_path / "test" / "cat" / "bad.png").write_bytes(b"not an image")
    test = load_split(tmp_path, "test")
    with pytest.raises(DatasetError, match="cannot decode image .*bad.png"):
        test.views([f.decode() for f in test.files].index("cat/bad.png"), [Preprocess()])


def test_parse_classes():
    assert parse_classes("0-4") == [0, 1, 2, 3, 4]
    assert parse_classes("0,2,5-7", 10) == [0, 2, 5, 6, 7]
    assert parse_classes(None, 3) == [0, 1, 2]
    for bad in ("a-b", "4-1", "", "1-"):
        with pytest.raises(DatasetError):
            parse_classes(bad, 10)
    with pytest.raises(DatasetError, match="unknown class 12"):
        parse_classes("0-12", 10)


def test_subset_and_split():
    ds = Dataset(np.zeros((10, 1, 2, 2), np.uint8), np.arange(10) % 5, [str(i) for i in range(5)])
    assert len(ds.subset([0, 1])) == 4
    with pytest.raises(DatasetError, match="do not exist"):
        ds.subset([7])
    q, g = query_gallery_split(10_000)
    assert len(q) == 2000 and len(g) == 8000 and (q % 5 == 0).all() and not set(q) & set(g)
