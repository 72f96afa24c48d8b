"""Unlabeled images in BCT (trainer/unlabeled.py), the warm start from the old weights (trainer/warm_start.py)
and the three-way class split of the compatibility matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.artifact import load_model
from trainer.cli import train_main
from trainer.data import load_split
from trainer.errors import ConfigError, DatasetError, IncompatibleModelsError
from trainer.evaluate import embed_models, evaluate_models
from trainer.model import build_model
from trainer.train import TrainConfig, reusable, train
from trainer.unlabeled import UnlabeledPull, load_unlabeled, neighbour_targets
from trainer.warm_start import warm_start

COMMON = dict(epochs=2, batch_size=64, threads=1, workers=0)


@pytest.fixture(scope="module")
def v1(tmp_path_factory, tiny_data) -> Path:
    """A tiny v1 on classes 0-3 (classes 6-9 are then unseen by a 0-5 child)."""
    out = tmp_path_factory.mktemp("unl") / "v1"
    train(TrainConfig(out=str(out), data=str(tiny_data), classes="0-3", **COMMON))
    return out


def test_neighbour_targets_match_brute_force():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(300, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    got = neighbour_targets(torch.from_numpy(emb), k=7, chunk=64).numpy()
    sims = emb @ emb.T
    want = np.stack([emb[np.argsort(-row)[:7]].mean(0) for row in sims])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # k = 1: each image's own embedding (itself is its nearest neighbour)
    np.testing.assert_allclose(neighbour_targets(torch.from_numpy(emb), k=1).numpy(), emb, atol=1e-6)


def test_load_unlabeled_from_a_dataset_folder_drops_labels_and_samples_by_seed(tiny_data):
    full = load_unlabeled(tiny_data)
    assert len(full) == len(load_split(tiny_data, "train"))
    assert (full.labels == np.arange(len(full))).all()  # a row per image, no class
    a, b = load_unlabeled(tiny_data, limit=50, seed=3), load_unlabeled(tiny_data, limit=50, seed=3)
    assert len(a) == 50 and (a.images == b.images).all()
    assert not (load_unlabeled(tiny_data, limit=50, seed=4).images == a.images).all()


def test_load_unlabeled_from_any_folder_of_images_recursively(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for i, where in enumerate([tmp_path, tmp_path / "a", tmp_path / "a" / "b"]):
        Image.new("L", (30 + i, 20), 100 + i).save(where / f"{i}.png")
    (tmp_path / "manifest.json").write_text("{}")  # not an image: ignored
    ds = load_unlabeled(tmp_path)
    assert len(ds) == 3 and list(ds.labels) == [0, 1, 2]
    with pytest.raises(DatasetError, match="not a folder"):
        load_unlabeled(tmp_path / "a" / "b" / "0.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        load_unlabeled(tmp_path / "empty")
    with pytest.raises(DatasetError, match="not a folder"):
        load_unlabeled(tmp_path / "missing")


def test_unlabeled_needs_bct_and_valid_settings(tmp_path, tiny_data, v1):
    with pytest.raises(ConfigError, match="needs --old DIR and --bct"):
        train(TrainConfig(out=str(tmp_path / "x"), data=str(tiny_data), unlabeled=str(tiny_data), **COMMON))
    with pytest.raises(ConfigError, match="unlabeled target"):
        UnlabeledPull(target="nearest")
    with pytest.raises(ConfigError):
        UnlabeledPull(weight=0)
    with pytest.raises(ConfigError, match="init-from-old"):
        train(TrainConfig(out=str(tmp_path / "y"), data=str(tiny_data), init_from_old=True, **COMMON))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def _unseen_cosine(data: Path, old: Path, new: Path) -> float:
    """Mean cosine between the new and the old model's embeddings of the test images of classes 6-9."""
    test = load_split(data, "test")
    embs = embed_models([load_model(old), load_model(new)], test)
    unseen = test.labels >= 6
    return float(
        (embs[load_model(old).version][unseen] * embs[load_model(new).version][unseen]).sum(1).mean()
    )


def test_the_unlabeled_pull_keeps_unseen_classes_where_the_old_model_puts_them(tmp_path, tiny_data, v1):
    base = dict(data=str(tiny_data), classes="0-5", old=str(v1), bct="full", **COMMON)
    train(TrainConfig(out=str(tmp_path / "plain"), **base))
    res = train(
        TrainConfig(
            out=str(tmp_path / "pulled"),
            unlabeled=str(tiny_data),
            unlabeled_weight=16.0,
            unlabeled_target="old",
            **base,
        )
    )
    assert res.history[-1]["unlabeled"] > 0  # the term ran and is logged
    assert res.card.train_config["unlabeled_pull"]["target"] == "old"
    without = _unseen_cosine(tiny_data, v1, tmp_path / "plain")
    with_pull = _unseen_cosine(tiny_data, v1, tmp_path / "pulled")
    assert with_pull > without + 0.05, (with_pull, without)
    # the settings are part of what is trained: another target is another model
    assert reusable(
        TrainConfig(
            out=str(tmp_path / "pulled"),
            unlabeled=str(tiny_data),
            unlabeled_weight=16.0,
            unlabeled_target="old",
            **base,
        )
    )
    for other in ({"unlabeled_target": "neighbours"}, {"unlabeled_weight": 8.0}, {"unlabeled_limit": 50}):
        cfg = {"unlabeled_weight": 16.0, "unlabeled_target": "old", **other}
        assert not reusable(
            TrainConfig(out=str(tmp_path / "pulled"), unlabeled=str(tiny_data), **cfg, **base)
        )


def test_warm_start_begins_as_the_old_model(v1, tiny_data):
    old = load_model(v1)
    model = build_model("resnet", list(range(6)))
    rows = torch.randn(6, 128)
    warm_start(model, old.preprocess, old, rows)
    model.eval()
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(model.embed(x), old.model.embed(x))
    torch.testing.assert_close(model.head.weight[:4], old.model.head.weight)  # classes 0-3: the old rows
    cos = torch.nn.functional.cosine_similarity(model.head.weight[4:], rows[4:])
    assert (cos > 0.999).all()  # classes 4-5: the given rows' directions
    with pytest.raises(IncompatibleModelsError, match="architecture"):
        warm_start(build_model("resnet", list(range(6)), width=8), old.preprocess, old)


def test_init_from_old_trains_and_is_recorded(tmp_path, tiny_data, v1):
    res = train(
        TrainConfig(
            out=str(tmp_path / "v2"),
            data=str(tiny_data),
            classes="0-5",
            old=str(v1),
            bct="full",
            init_from_old=True,
            **{**COMMON, "epochs": 1},
        )
    )
    assert res.card.train_config["init_from_old"] is True
    assert res.card.compatible_with == "v1"


def test_init_from_old_alone_is_plain_fine_tuning(tmp_path, tiny_data, v1):
    """Without --bct, --init-from-old fine-tunes the old network: it starts from the old weights (a tiny lr
    keeps it there) and, making no compatibility promise, founds its own space."""
    res = train(
        TrainConfig(
            out=str(tmp_path / "ft"),
            data=str(tiny_data),
            classes="0-3",
            old=str(v1),
            init_from_old=True,
            lr=1e-6,
            **{**COMMON, "epochs": 1},
        )
    )
    assert res.card.space == "ft" and res.card.compatible_with is None
    old, new = load_model(v1).model, load_model(tmp_path / "ft").model
    for (name, a), b in zip(
        old.backbone.state_dict().items(), new.backbone.state_dict().values(), strict=True
    ):
        if a.is_floating_point() and "running" not in name:
            torch.testing.assert_close(a, b, atol=1e-3, rtol=0)
    # a fresh network of the same seed starts elsewhere
    fresh = train(
        TrainConfig(
            out=str(tmp_path / "fresh"),
            data=str(tiny_data),
            classes="0-3",
            lr=1e-6,
            **{**COMMON, "epochs": 1},
        )
    )
    w_old = next(iter(old.backbone.parameters()))
    w_fresh = next(iter(load_model(fresh.path).model.backbone.parameters()))
    assert (w_old - w_fresh).abs().max() > 1e-2


def test_matrix_splits_queries_three_ways(tmp_path, tiny_data, v1):
    train(
        TrainConfig(
            out=str(tmp_path / "v2"),
            data=str(tiny_data),
            classes="0-5",
            old=str(v1),
            bct="full",
            **{**COMMON, "epochs": 1},
        )
    )
    test = load_split(tiny_data, "test")
    report = evaluate_models([load_model(v1), load_model(tmp_path / "v2")], test)
    cell = report.matrix["v2/v1"]
    parts = {p: cell[p]["n_queries"] for p in ("old_classes", "new_classes", "unseen_classes")}
    labels = test.labels[::5]
    assert parts == {
        "old_classes": int((labels <= 3).sum()),
        "new_classes": int(((labels >= 4) & (labels <= 5)).sum()),
        "unseen_classes": int((labels >= 6).sum()),
    }
    # a model set that knows every class has no unseen part
    full = evaluate_models([load_model(v1)], test, old_classes=list(range(10)))
    assert "unseen_classes" not in full.matrix["v1/v1"]


def test_cli_refuses_unlabeled_without_bct_or_a_folder(tmp_path, tiny_data, v1, capsys):
    assert (
        train_main(["--out", str(tmp_path / "a"), "--data", str(tiny_data), "--unlabeled", str(tiny_data)])
        == 2
    )
    assert "needs --old DIR and --bct" in capsys.readouterr().err
    args = ["--out", str(tmp_path / "b"), "--data", str(tiny_data), "--old", str(v1), "--bct"]
    assert train_main([*args, "--unlabeled", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_unlabeled_images_from_a_folder_like_a_gallery_export(tmp_path, tiny_data, v1):
    """A folder of PNG files (what `graceful export-sources` writes) trains through the folder loader."""
    export = tmp_path / "export"
    export.mkdir()
    images = load_split(tiny_data, "test").images[:40, 0]
    for i, img in enumerate(images):
        Image.fromarray(img).save(export / f"{i + 1}.png")
    (export / "manifest.json").write_text("{}")
    res = train(
        TrainConfig(
            out=str(tmp_path / "v2"),
            data=str(tiny_data),
            classes="0-5",
            old=str(v1),
            bct="full",
            unlabeled=str(export),
            **{**COMMON, "epochs": 1},
        )
    )
    assert res.history[-1]["unlabeled"] > 0
    assert res.card.train_config["unlabeled_pull"] == {"weight": 16.0, "target": "old", "k": 10, "batch": 128}
