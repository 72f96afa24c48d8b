"""The input contract (trainer/preprocess.py): resize policies, non-square and RGB contracts, cards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.errors import ConfigError
from trainer.preprocess import LEGACY_MEAN, LEGACY_STD, Preprocess


def _gray(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), "L")


def _columns(w: int, h: int) -> np.ndarray:
    """(h, w) uint8 whose value at column x is x (a horizontal ramp: where a crop came from shows)."""
    return np.tile(np.arange(w, dtype=np.uint8), (h, 1))


def test_image_of_the_contract_size_is_only_converted():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    for resize in ("fit", "pad", "stretch"):
        out = Preprocess(resize=resize).from_pil(_gray(arr))
        assert out.shape == (1, 28, 28) and out.dtype == np.uint8
        np.testing.assert_array_equal(out[0], arr)


def test_fit_scales_the_shorter_side_then_crops_the_centre():
    # 56 wide, 28 high: the shorter side is already 28, so fit only crops columns 14..41.
    arr = _columns(56, 28)
    out = Preprocess(resize="fit").from_pil(_gray(arr))
    np.testing.assert_array_equal(out[0], arr[:, 14:42])
    # Tall: 28 wide, 84 high: rows 28..55 kept.
    tall = np.tile(np.arange(84, dtype=np.uint8)[:, None], (1, 28))  # value = row index
    out = Preprocess(resize="fit").from_pil(_gray(tall))
    np.testing.assert_array_equal(out[0], tall[28:56])


def test_pad_fits_the_longer_side_and_centres_on_black():
    white = np.full((28, 56), 255, np.uint8)  # 56 wide, 28 high -> 28 x 14, padded above and below
    out = Preprocess(resize="pad").from_pil(_gray(white))[0]
    assert out.shape == (28, 28)
    assert (out[:7] == 0).all() and (out[21:] == 0).all()
    assert (out[7:21] == 255).all()


def test_stretch_ignores_the_aspect():
    arr = np.zeros((28, 56), np.uint8)
    arr[:, 28:] = 255  # right half white
    out = Preprocess(resize="stretch", interpolation="nearest").from_pil(_gray(arr))[0]
    assert (out[:, :14] == 0).all() and (out[:, 14:] == 255).all()


def test_non_square_contract_fit_and_pad():
    sq = np.tile(np.arange(100, dtype=np.uint8)[:, None], (1, 100))  # value = row
    fit = Preprocess(height=20, width=40, resize="fit").from_pil(_gray(sq))
    assert fit.shape == (1, 20, 40)
    # 100x100 -> 40x40, rows 10..29 kept: the middle rows of the original (values about 25..74)
    assert 20 <= fit[0, 0].mean() <= 30 and 70 <= fit[0, -1].mean() <= 80
    pad = Preprocess(height=20, width=40, resize="pad").from_pil(_gray(np.full((100, 100), 200, np.uint8)))
    assert pad.shape == (1, 20, 40)
    assert (pad[0, :, :10] == 0).all() and (pad[0, :, 30:] == 0).all() and (pad[0, :, 10:30] == 200).all()
    stretch = Preprocess(height=20, width=40, resize="stretch").from_pil(_gray(sq))
    assert stretch.shape == (1, 20, 40) and stretch[0, 0].mean() < 10 and stretch[0, -1].mean() > 90


def test_rgb_contract_keeps_colour_and_gray_contract_takes_luminance():
    red = Image.new("RGB", (50, 30), (255, 0, 0))
    rgb = Preprocess(channels=3, height=16, width=16, mean=0.5, std=0.25).from_pil(red)
    assert rgb.shape == (3, 16, 16)
    assert (rgb[0] == 255).all() and (rgb[1] == 0).all() and (rgb[2] == 0).all()
    gray = Preprocess().from_pil(red)
    assert gray.shape == (1, 28, 28) and abs(int(gray[0, 0, 0]) - 76) <= 1  # ITU-R 601 luma of red
    # a gray image into an RGB contract: three equal channels
    g = Preprocess(channels=3, height=8, width=8).from_pil(_gray(np.full((8, 8), 90, np.uint8)))
    assert (g == 90).all() and g.shape == (3, 8, 8)


def test_scaled_size_covers_for_fit_and_fits_for_pad():
    rng = np.random.default_rng(1)
    for _ in range(300):
        ch, cw = (int(v) for v in rng.integers(1, 300, 2))
        w, h = (int(v) for v in rng.integers(1, 5000, 2))
        sw, sh = Preprocess(height=ch, width=cw, resize="fit").scaled_size(w, h)
        assert sw >= cw and sh >= ch and (sw == cw or sh == ch), (ch, cw, w, h, sw, sh)
        pw, ph = Preprocess(height=ch, width=cw, resize="pad").scaled_size(w, h)
        assert pw <= cw and ph <= ch and (pw == cw or ph == ch), (ch, cw, w, h, pw, ph)
        assert Preprocess(height=ch, width=cw, resize="stretch").scaled_size(w, h) == (cw, ch)


def test_interpolation_is_the_cards():
    arr = np.array([[0, 255], [255, 0]], np.uint8)
    up = Preprocess(height=4, width=4, interpolation="nearest").from_pil(_gray(arr))[0]
    np.testing.assert_array_equal(up, np.kron(arr, np.ones((2, 2), np.uint8)))
    smooth = Preprocess(height=4, width=4, interpolation="bilinear").from_pil(_gray(arr))[0]
    assert ((smooth > 0) & (smooth < 255)).any()


def test_from_array_gives_each_model_its_own_view_of_the_same_images():
    rng = np.random.default_rng(2)
    gray28 = rng.integers(0, 256, (3, 1, 28, 28), dtype=np.uint8)
    rgb = Preprocess(channels=3, height=32, width=48).from_array(gray28)
    assert rgb.shape == (3, 3, 32, 48)
    assert (rgb[:, 0] == rgb[:, 1]).all() and (rgb[:, 1] == rgb[:, 2]).all()
    same = Preprocess().from_array(gray28)
    assert same is gray28


def test_normalisation_is_per_channel():
    prep = Preprocess(channels=3, height=2, width=2, mean=[0.0, 0.5, 1.0], std=[1.0, 0.5, 0.25])
    x = np.full((1, 3, 2, 2), 255, np.uint8)
    out = prep(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([1.0, 1.0, 0.0]))


def test_cards_written_before_height_and_width_keep_their_contract():
    old = Preprocess.from_dict({"size": 28, "mean": LEGACY_MEAN, "std": LEGACY_STD})
    assert old == Preprocess() and old.shape == (1, 28, 28)
    full = Preprocess(channels=3, height=20, width=40, resize="pad", mean=[0.1, 0.2, 0.3], std=0.5)
    assert Preprocess.from_dict(full.to_dict()) == full
    with pytest.raises(ConfigError, match="not square"):
        _ = full.size


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"channels": 2}, "channels"),
        ({"resize": "crop"}, "fit, pad, stretch"),
        ({"interpolation": "magic"}, "interpolation"),
        ({"height": 0}, "size"),
        ({"channels": 3, "mean": [0.1, 0.2]}, "mean"),
        ({"std": 0.0}, "std"),
    ],
)
def test_bad_contracts_are_refused_by_name(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        Preprocess(**kwargs)
