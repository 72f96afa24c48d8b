"""Transforms (old space -> new space): exact on known maps, fitted between two tiny models, saved, reloaded,
refused when broken, invisible to model loading, and the `transform` command."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from trainer.adapter import fit_adapter
from trainer.artifact import load_model, read_card
from trainer.cli import train_main, transform_main
from trainer.errors import TransformError
from trainer.transform import (
    TRANSFORMS_DIR,
    TransformCard,
    TransformConfig,
    VectorTransform,
    fit_transform,
    list_transforms,
    load_transform,
    transform_dir,
)
from trainer.verify import verify_weights

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/trainer/conftest.py

FAST = ["--epochs", "1", "--batch-size", "64", "--quiet", "--threads", "1", "--limit", "120"]


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _in_memory(kind: str, x: np.ndarray, y: np.ndarray) -> VectorTransform:
    module, info = fit_adapter(kind, x, y)
    card = TransformCard(
        source="a",
        source_space="a",
        source_sha256="0" * 64,
        target="b",
        target_space="b",
        target_sha256="1" * 64,
        kind=kind,
        in_dim=x.shape[1],
        out_dim=y.shape[1],
        sample_size=len(x),
        adapter=module.cfg.to_dict(),
        fit=info,
        weights_sha256="2" * 64,
    )
    return VectorTransform(card, module)


def test_affine_transform_recovers_a_known_map():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(16, 24)), rng.normal(size=16)  # old 24-d -> new 16-d
    x = _unit(rng.normal(size=(300, 24)))
    t = _in_memory("affine", x, x @ a.T + b)
    x_new = _unit(rng.normal(size=(50, 24))).astype(np.float32)
    got = t.apply(x_new)
    assert got.dtype == np.float32 and got.shape == (50, 16)
    np.testing.assert_allclose(got, _unit(x_new @ a.T + b), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(t.apply(x_new, batch=7), got, atol=1e-6)  # batching: same up to BLAS order


def test_procrustes_transform_recovers_a_rotation_and_checks_shapes():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(32, 32)))
    x = _unit(rng.normal(size=(200, 32)))
    t = _in_memory("procrustes", x, x @ q.T)
    x_new = _unit(rng.normal(size=(40, 32)))
    np.testing.assert_allclose(t.apply(x_new), _unit(x_new @ q.T), atol=1e-5)
    assert t.apply(np.zeros((0, 32))).shape == (0, 32)
    for bad in (np.zeros((3, 31)), np.zeros(32), np.full((2, 32), np.nan)):
        with pytest.raises(TransformError):
            t.apply(bad)


@pytest.fixture(scope="module")
def models(tiny_data, tmp_path_factory) -> Path:
    """v1 (classes 0-4, 24-d) and an independent v2 (all classes, 32-d), in one models dir."""
    root = tmp_path_factory.mktemp("transform-models")
    for name, extra in (
        ("v1", ["--classes", "0-4", "--embedding-dim", "24", "--width", "8"]),
        ("v2", ["--seed", "1", "--embedding-dim", "32", "--width", "8"]),
    ):
        assert train_main(["--data", str(tiny_data), "--out", str(root / name), *extra, *FAST]) == 0
    return root


@pytest.fixture(scope="module")
def fitted(models, tiny_data, tmp_path_factory):
    """An mlp transform v1 -> v2, fitted in a copy of the models dir."""
    root = tmp_path_factory.mktemp("transform-fitted") / "models"
    shutil.copytree(models, root)
    said: list[str] = []
    cfg = TransformConfig(
        old=str(root / "v1"), new=str(root / "v2"), data=str(tiny_data), sample=300, hidden=32, steps=40
    )
    return root, fit_transform(cfg, progress=said.append), said


def test_fit_transform_saves_and_round_trips(fitted):
    root, result, said = fitted
    assert result.path == transform_dir(root / "v2", "v1") == root / "v2" / TRANSFORMS_DIR / "v1"
    assert sorted(p.name for p in result.path.iterdir()) == ["transform.json", "weights.safetensors"]
    card = result.card
    assert (card.source, card.target, card.kind, card.in_dim, card.out_dim) == ("v1", "v2", "mlp", 24, 32)
    assert card.source_sha256 == read_card(root / "v1").weights_sha256
    assert card.target_sha256 == read_card(root / "v2").weights_sha256
    assert card.sample_size == 300 and card.train_config["sample"] == 300
    assert {"sample_cos", "holdout_cos", "holdout_n"} <= set(card.fit) and card.fit["holdout_n"] == 30
    assert len(said) == 3 and said[-1].startswith("saved to")
    assert json.loads((result.path / "transform.json").read_text())["weights_sha256"] == card.weights_sha256
    loaded = load_transform(result.path)
    assert loaded.card == card
    vecs = _unit(np.random.default_rng(2).normal(size=(64, 24))).astype(np.float32)
    assert result.transform is not None
    np.testing.assert_array_equal(loaded.apply(vecs), result.transform.apply(vecs))
    np.testing.assert_allclose(np.linalg.norm(loaded.apply(vecs), axis=1), 1.0, atol=1e-5)


def test_a_refit_replaces_the_transform(fitted, tiny_data):
    root, first, _ = fitted
    cfg = TransformConfig(
        old=str(root / "v1"), new=str(root / "v2"), data=str(tiny_data), sample=100, kind="affine"
    )
    second = fit_transform(cfg)
    assert second.path == first.path and load_transform(second.path).card.kind == "affine"
    assert sorted(p.name for p in (root / "v2" / TRANSFORMS_DIR).iterdir()) == ["v1"]  # no leftovers
    assert [c.kind for c in list_transforms(root / "v2")] == ["affine"]


def test_broken_transforms_are_refused(fitted, tmp_path):
    _, result, _ = fitted
    t = tmp_path / "t"
    shutil.copytree(result.path, t)
    weights = t / "weights.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF  # one changed byte of tensor data
    weights.write_bytes(bytes(raw))
    with pytest.raises(TransformError, match="checksum"):
        load_transform(t)
    weights.unlink()
    with pytest.raises(TransformError, match="no regular weights file"):
        load_transform(t)
    (t / "transform.json").write_text("{not json")
    with pytest.raises(TransformError, match="not valid JSON"):
        load_transform(t)
    (t / "transform.json").write_text(json.dumps({"source": "v1"}))
    with pytest.raises(TransformError, match="not a valid transform card"):
        load_transform(t)
    with pytest.raises(TransformError, match="no transform.json"):
        load_transform(tmp_path / "nowhere")


def test_a_transform_in_another_models_folder_is_stale(fitted, tmp_path):
    root, result, _ = fitted
    other = tmp_path / "v3"
    shutil.copytree(root / "v1", other)  # any valid model folder other than v2
    card = json.loads((other / "card.json").read_text())
    (other / "card.json").write_text(json.dumps({**card, "version": "v3"}))
    shutil.copytree(result.path, transform_dir(other, "v1"))
    with pytest.raises(TransformError, match="fit it again"):
        load_transform(transform_dir(other, "v1"))
    assert list_transforms(other) == []


def test_list_transforms_skips_broken_ones(fitted, tmp_path, caplog):
    root, _, _ = fitted
    new = tmp_path / "v2"
    shutil.copytree(root / "v2", new)
    broken = transform_dir(new, "v0")
    broken.mkdir()
    (broken / "transform.json").write_text("[]")
    (new / TRANSFORMS_DIR / ".v9.tmp-1").mkdir()  # a fit being written: not a transform yet
    with caplog.at_level(logging.WARNING, logger="trainer.transform"):
        cards = list_transforms(new)
    assert [c.source for c in cards] == ["v1"]
    assert "v0" in caplog.text and ".v9" not in caplog.text
    assert list_transforms(tmp_path / "no-such-model") == []


def test_a_model_folder_with_transforms_still_loads(fitted, tiny_data):
    root, _, _ = fitted
    folder = root / "v2"
    assert (folder / TRANSFORMS_DIR / "v1").is_dir()
    loaded = load_model(folder)
    assert loaded.version == "v2" and loaded.card.embedding_dim == 32
    verify_weights(folder, read_card(folder))

    from service.models.registry import ModelRegistry

    class Gallery:  # the registry only writes each valid version into the catalog
        def register_version(self, info) -> None:
            pass

    entries = ModelRegistry(root, Gallery()).scan()  # type: ignore[arg-type]
    assert sorted((e.version, e.error) for e in entries) == [("v1", None), ("v2", None)]


def test_bad_inputs_are_refused(models, tiny_data, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(models, root)
    base = {"data": str(tiny_data), "sample": 50, "steps": 5, "hidden": 8}
    old, new = str(root / "v1"), str(root / "v2")
    with pytest.raises(TransformError, match="unknown transform kind"):
        fit_transform(TransformConfig(old=old, new=new, kind="quadratic", **base))
    with pytest.raises(TransformError, match="same model folder"):
        fit_transform(TransformConfig(old=old, new=old, **base))
    with pytest.raises(TransformError, match="at least 2"):
        fit_transform(TransformConfig(old=old, new=new, **{**base, "sample": 1}))
    with pytest.raises(TransformError, match="procrustes"):
        fit_transform(TransformConfig(old=old, new=new, kind="procrustes", **base))
    # An adapter version (card with adapter_of) and an external one (no image model).
    adapter = root / "v2-to-v1"
    shutil.copytree(root / "v2", adapter)
    card = json.loads((adapter / "card.json").read_text())
    (adapter / "card.json").write_text(json.dumps({**card, "version": "v2-to-v1", "adapter_of": "v2"}))
    with pytest.raises(TransformError, match="adapter version"):
        fit_transform(TransformConfig(old=old, new=str(adapter), **base))
    ext = root / "ext"
    ext.mkdir()
    (ext / "card.json").write_text(
        json.dumps(
            {
                "format": "external",
                "version": "ext",
                "embedding_dim": 24,
                "space": "ext",
                "compatible_with": None,
            }
        )
    )
    with pytest.raises(TransformError, match="external"):
        fit_transform(TransformConfig(old=str(ext), new=new, **base))
    with pytest.raises(TransformError, match="bad model version name"):
        transform_dir(root / "v2", "../v1")
    assert not (root / "v2" / TRANSFORMS_DIR).exists()  # nothing written by a refused fit


def test_cli_transform(models, tiny_data, tmp_path, capsys):
    root = tmp_path / "models"
    shutil.copytree(models, root)
    args = ["--old", str(root / "v1"), "--new", str(root / "v2"), "--data", str(tiny_data)]
    rc = transform_main(
        [*args, "--kind", "affine", "--sample", "200", "--threads", "1", "--eval-limit", "100"]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"saved transform v1 -> v2 to {transform_dir(root / 'v2', 'v1')}" in out
    for key in ("new/old", "new/transformed-old", "new/new", "old/old", "update gain"):
        assert key in out
    assert load_transform(transform_dir(root / "v2", "v1")).card.kind == "affine"

    rc = transform_main([*args, "--kind", "procrustes", "--no-eval"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("graceful: error:") and "procrustes" in err and err.count("\n") == 1
    assert transform_main([*args[:2], "--new", str(root / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
