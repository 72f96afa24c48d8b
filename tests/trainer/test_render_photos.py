"""scripts/render_photos.py: the photo-like folder dataset made from Fashion-MNIST-style items."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from tests.support.photos import render_script, tiny_items, write_tiny_photos


def test_class_folders_sort_in_label_order():
    rp = render_script()
    names = rp.class_folder_names(["T-shirt/top", "Trouser", "Ankle boot"])
    assert names == ["0_tshirt_top", "1_trouser", "2_ankle_boot"]
    many = rp.class_folder_names([str(i) for i in range(12)])
    assert many[0] == "00" and sorted(many) == many


def test_rendered_folder(tmp_path):
    root = write_tiny_photos(tmp_path / "photos", per_class_train=3, per_class_test=1)
    rows = render_script().read_manifest(root)
    assert len(rows) == 40 and {r["split"] for r in rows} == {"train", "test"}
    assert "SYNTHETIC" in (root / "README.md").read_text()
    classes = sorted(p.name for p in (root / "train").iterdir())
    assert len(classes) == 10 and classes[3].startswith("3_")
    seen = {"fmt": set(), "mode": set(), "oriented": 0}
    for r in rows:
        path = root / r["file"]
        assert path.parent.name == classes[int(r["label"])]
        with Image.open(path) as im:
            up = ImageOps.exif_transpose(im)
            assert up.size == (int(r["width"]), int(r["height"]))
            assert min(up.size) >= 40 and max(up.size) <= 96
            seen["fmt"].add(im.format)
            seen["mode"].add(im.mode)
        seen["oriented"] += r["orientation"] != "1"
    assert seen["fmt"] == {"JPEG", "PNG"} and {"RGB", "L", "RGBA"} <= seen["mode"]
    assert seen["oriented"] > 0


def test_exif_orientation_restores_the_upright_picture():
    rp = render_script()
    items, _ = tiny_items(1, seed=3)
    opts = rp.RenderOptions(min_size=64, max_size=120, png_share=0.5, exif_share=1.0)
    for i in range(10):
        rng = rp.item_rng(0, "test", i)
        picture = rp.render_item(items[i], rng, opts)
        data, fmt, orientation, _ = rp.encode(picture, rng, opts)
        assert orientation in range(2, 9)
        with Image.open(io.BytesIO(data)) as im:
            up = ImageOps.exif_transpose(im).convert("RGB")
        assert up.size == picture.size
        # JPEG loses a little; every other orientation of the picture is further off than the upright one
        views = {None: picture, **{t: picture.transpose(t) for t in Image.Transpose}}
        err = {
            t: np.abs(np.asarray(up, np.float32) - np.asarray(v, np.float32)).mean()
            for t, v in views.items()
            if v.size == up.size
        }
        assert min(err, key=err.__getitem__) is None and err[None] < 16, (i, fmt, orientation, err)


def test_seeded_and_limited(tmp_path, tiny_data):
    rp = render_script()
    for out in ("a", "b"):
        assert (
            rp.main(["--out", str(tmp_path / out), "--data", str(tiny_data), "--limit", "7", "--quiet"]) == 0
        )
    rows_a = rp.read_manifest(tmp_path / "a")
    assert len(rows_a) == 14  # 7 of each split
    for r in rows_a:
        assert (tmp_path / "a" / r["file"]).read_bytes() == (tmp_path / "b" / r["file"]).read_bytes()
    assert rp.main(["--out", str(tmp_path / "c"), "--data", str(tmp_path / "nope"), "--quiet"]) == 2
