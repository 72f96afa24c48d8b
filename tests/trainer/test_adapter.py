"""Adapters: exact closed forms on known maps, the MLP on a non-linear drift, and adapter versions on disk."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from service.console.cli import main
from trainer.adapt import adapted_embeddings
from trainer.adapter import AdaptedModel, MLPFit, fit_adapter, fit_affine, fit_mlp, fit_procrustes
from trainer.artifact import embed_images, load_model
from trainer.errors import ConfigError, ModelCardError

FAST = ["--epochs", "1", "--batch-size", "64", "--quiet", "--threads", "1", "--limit", "200"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/trainer/conftest.py


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_procrustes_recovers_a_known_rotation_exactly():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(128, 128)))  # a random orthogonal map
    x = _unit(rng.normal(size=(500, 128)))
    w = fit_procrustes(x, x @ q.T)
    np.testing.assert_allclose(w, q, atol=1e-5)
    adapter, info = fit_adapter("procrustes", x, x @ q.T)
    np.testing.assert_allclose(adapter.linear.weight.numpy(), q, atol=1e-5)
    assert adapter.linear.bias is None and info["sample_cos"] > 1 - 1e-5


def test_procrustes_between_sizes_is_semi_orthogonal():
    rng = np.random.default_rng(1)
    w = fit_procrustes(rng.normal(size=(300, 64)), rng.normal(size=(300, 32)))  # (32, 64)
    np.testing.assert_allclose(w @ w.T, np.eye(32), atol=1e-8)


def test_affine_recovers_a_known_affine_map():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(32, 48)), rng.normal(size=32)
    x = rng.normal(size=(400, 48))
    w, c = fit_affine(x, x @ a.T + b)
    np.testing.assert_allclose(w, a, atol=1e-8)
    np.testing.assert_allclose(c, b, atol=1e-8)
    adapter, _ = fit_adapter("affine", x, x @ a.T + b)
    np.testing.assert_allclose(adapter.linear.bias.numpy(), b, atol=1e-5)


def test_mlp_reduces_error_on_a_non_linear_drift():
    rng = np.random.default_rng(3)
    m1, m2 = rng.normal(size=(16, 16)), rng.normal(size=(16, 16)) / 4
    x = _unit(rng.normal(size=(3000, 16)))
    y = _unit(np.tanh(2 * x @ m1.T) + x @ m2.T)  # a drift no affine map captures
    adapter, info = fit_mlp(x, y, MLPFit(hidden=64, steps=600, lr=3e-3, seed=0))
    # Held-out cosine loss: the MLP starts at the affine fit and must end clearly below it.
    assert info["holdout_cos_loss"] < 0.5 * info["holdout_cos_loss_affine"], info
    x_new = _unit(rng.normal(size=(500, 16)))
    y_new = _unit(np.tanh(2 * x_new @ m1.T) + x_new @ m2.T)
    w, b = fit_affine(x, y)
    cos_affine = (_unit(x_new @ w.T + b) * y_new).sum(1).mean()
    with torch.no_grad():
        cos_mlp = F.cosine_similarity(
            adapter(torch.from_numpy(x_new).float()), torch.from_numpy(y_new).float()
        ).mean()
    assert float(cos_mlp) > cos_affine + 0.02


def test_bad_fit_input_is_refused():
    with pytest.raises(ConfigError, match="pairs"):
        fit_procrustes(np.zeros((5, 4)), np.zeros((6, 4)))
    with pytest.raises(ConfigError, match="unknown adapter kind"):
        fit_adapter("quadratic", np.zeros((5, 4)), np.zeros((5, 4)))


@pytest.fixture(scope="module")
def models(tiny_data, tmp_path_factory):
    """v1 on classes 0-4 and an independent v2 on 0-9, in one models dir."""
    root = tmp_path_factory.mktemp("adapter-models")
    assert (
        main(["train", "--data", str(tiny_data), "--out", str(root / "v1"), "--classes", "0-4", *FAST]) == 0
    )
    assert (
        main(
            [
                "train",
                "--data",
                str(tiny_data),
                "--out",
                str(root / "v2"),
                "--seed",
                "1",
                "--width",
                "12",
                *FAST,
            ]
        )
        == 0
    )
    return root


@pytest.mark.parametrize("kind", ["procrustes", "affine", "mlp"])
def test_adapter_version_round_trips(models, tiny_data, kind, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(models, root)
    out = root / f"v2-to-v1-{kind}"
    rc = main(
        [
            "adapt",
            "--new",
            str(root / "v2"),
            "--old",
            str(root / "v1"),
            "--out",
            str(out),
            "--kind",
            kind,
            "--sample",
            "300",
            "--data",
            str(tiny_data),
            "--steps",
            "50",
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    card = json.loads((out / "card.json").read_text())
    assert card["space"] == "v1" and card["compatible_with"] == "v1" and card["adapter_of"] == "v2"
    assert card["train_config"]["sample_size"] == 300 and card["arch"]["kind"] == kind
    assert "v2-to-v1-" + kind + "/v1" in card["metrics"]["matrix"]
    # The folder holds the adapter's own tensors only, in safetensors.
    tensors = load_file(str(out / "weights.safetensors"))
    assert all(k.startswith("adapter.") or k == "head.weight" for k in tensors) and "head.weight" in tensors
    loaded, new = load_model(out), load_model(root / "v2")
    assert isinstance(loaded.model, AdaptedModel) and loaded.card.embedding_dim == 128
    assert loaded.model.fused == (
        kind == "procrustes"
    )  # folded into the new model's projection: 0 added cost
    images = np.random.default_rng(0).integers(0, 255, (7, 1, 28, 28), dtype=np.uint8)
    got = embed_images(loaded, images)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, adapted_embeddings(loaded, embed_images(new, images)), atol=1e-6)
    np.testing.assert_array_equal(
        got, embed_images(load_model(out), images)
    )  # a second load: same embeddings


def test_adapter_without_its_new_model_is_refused(models, tiny_data, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(models, root)
    assert (
        main(
            [
                "adapt",
                "--new",
                str(root / "v2"),
                "--old",
                str(root / "v1"),
                "--out",
                str(root / "ad"),
                "--sample",
                "100",
                "--data",
                str(tiny_data),
                "--eval-limit",
                "50",
            ]
        )
        == 0
    )
    shutil.copytree(root / "v2", root / "v2-backup")
    shutil.rmtree(root / "v2")
    with pytest.raises(ModelCardError, match="adapter_of.*missing"):
        load_model(root / "ad")
    # The new model's folder is back but holds other weights than the adapter was fitted to: refused too.
    shutil.copytree(models / "v1", root / "v2")
    card = json.loads((root / "v2" / "card.json").read_text())
    (root / "v2" / "card.json").write_text(json.dumps({**card, "version": "v2"}))
    with pytest.raises(ModelCardError, match="checksum differs"):
        load_model(root / "ad")


def test_adapt_cli_errors_are_one_line(models, tiny_data, tmp_path, capsys):
    def one_line(argv, needle):
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err and needle in err, err

    base = ["adapt", "--new", str(models / "v2"), "--old", str(models / "v1"), "--data", str(tiny_data)]
    one_line([*base, "--out", str(tmp_path / "elsewhere")], "next to the new model's folder")
    one_line([*base, "--out", str(models / "x"), "--kind", "quadratic"], "invalid choice")
    one_line([*base, "--out", str(models / "x"), "--sample", "1"], "at least 2")
    one_line(
        ["adapt", "--new", str(tmp_path / "nope"), "--old", str(models / "v1"), "--out", str(tmp_path / "a")],
        "does not exist",
    )
    assert not (models / "x").exists()
