"""Models with different input contracts: BCT/PC against an old model of another contract (each model sees
every image through its own), and adapters between them (trainer/adapt.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

import trainer.train as train_module
from tests.support.photos import write_tiny_photos
from trainer.adapt import AdaptConfig, adapt
from trainer.artifact import load_model
from trainer.train import TrainConfig, train

COMMON = dict(epochs=2, threads=1, workers=0)


@pytest.fixture(scope="module")
def old_grey(tmp_path_factory, tiny_data):
    """A 28x28 grey v1 on the tiny IDX data, classes 0-4."""
    root = tmp_path_factory.mktemp("models")
    train(TrainConfig(out=str(root / "v1"), data=str(tiny_data), classes="0-4", batch_size=64, **COMMON))
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_tiny_photos(tmp_path_factory.mktemp("photos"))


def _spy_old_inputs(monkeypatch, old: Path) -> list[tuple[int, ...]]:
    """The shapes of every batch the old model's backbone receives in train() (training and evaluation)."""
    seen: list[tuple[int, ...]] = []

    def load(folder):
        loaded = load_model(folder)
        if Path(folder) == old:
            loaded.model.backbone.register_forward_pre_hook(
                lambda _m, args: seen.append(tuple(args[0].shape))
            )
        return loaded

    monkeypatch.setattr(train_module, "load_model", load)
    return seen


@pytest.mark.parametrize("on", ["folder", "idx"])
def test_bct_new_rgb_against_old_grey(old_grey, photos, tiny_data, monkeypatch, on):
    seen = _spy_old_inputs(monkeypatch, old_grey / "v1")
    data = photos if on == "folder" else tiny_data
    out = old_grey / f"v2-rgb-{on}"
    cfg = TrainConfig(
        out=str(out),
        data=str(data),
        old=str(old_grey / "v1"),
        bct="full",
        size="32",
        channels=3,
        batch_size=16,
        **COMMON,
    )
    card = train(cfg).card
    assert card.preprocess["channels"] == 3 and card.preprocess["height"] == 32
    assert card.space == "v1" and card.compatible_with == "v1"
    # the old model saw every image as 28x28 grey: the class means, then each training step's second view
    assert seen and {s[1:] for s in seen} == {(1, 28, 28)}
    n = 40 if on == "folder" else 400  # training images; the class means pass, then each epoch
    assert sum(s[0] for s in seen) >= n * (1 + COMMON["epochs"])
    assert {"v1/v1", f"{out.name}/v1", f"{out.name}/{out.name}"} <= set(card.metrics["matrix"])


def test_pc_new_rgb_against_old_grey(old_grey, photos, monkeypatch):
    seen = _spy_old_inputs(monkeypatch, old_grey / "v1")
    cfg = TrainConfig(
        out=str(old_grey / "v2-pc"),
        data=str(photos),
        old=str(old_grey / "v1"),
        pc="fd-kl",
        size="32",
        channels=3,
        batch_size=16,
        **COMMON,
    )
    card = train(cfg).card
    assert card.preprocess["channels"] == 3 and {s[1:] for s in seen} == {(1, 28, 28)}


def test_adapt_between_contracts(old_grey, photos):
    new = old_grey / "new-rgb"
    train(TrainConfig(out=str(new), data=str(photos), size="32", channels=3, batch_size=16, **COMMON))
    result = adapt(
        AdaptConfig(
            new=str(new), old=str(old_grey / "v1"), out=str(old_grey / "ad"), data=str(photos), sample=30
        )
    )
    card = result.card
    assert card.adapter_of == "new-rgb" and card.space == "v1"
    assert card.preprocess == load_model(new).card.preprocess  # served as the new model, then the adapter
    assert card.train_config["sample_size"] == 30
    assert {"ad/v1", "new-rgb/new-rgb", "v1/v1"} <= set(card.metrics["matrix"])
    adapted = load_model(old_grey / "ad")  # loads: same contract as its new model
    assert adapted.preprocess.shape == (3, 32, 32)
