from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from trainer.artifact import ModelCard, embed_images, load_model, read_card, save_model
from trainer.errors import ModelCardError
from trainer.model import build_model


def _save(folder, classes=(0, 1, 2)):
    torch.manual_seed(0)
    model = build_model("small", list(classes))
    card = ModelCard(
        version=folder.name,
        arch=model.cfg.to_dict(),
        embedding_dim=128,
        classes=list(classes),
        space=folder.name,
        compatible_with=None,
    )
    return model, save_model(folder, model.eval(), card)


def test_round_trip_gives_identical_embeddings(tmp_path):
    model, card = _save(tmp_path / "v1")
    loaded = load_model(tmp_path / "v1")
    assert loaded.card == card and loaded.card.weights_sha256
    images = np.random.default_rng(0).integers(0, 255, (5, 1, 28, 28), dtype=np.uint8)
    with torch.no_grad():
        expected = model.embed(loaded.preprocess(images)).numpy()
    np.testing.assert_array_equal(embed_images(loaded, images), expected)
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_pickle_weights_are_refused(tmp_path):
    model, _ = _save(tmp_path / "v1")
    weights = tmp_path / "v1" / "weights.safetensors"
    weights.write_bytes(pickle.dumps(model.state_dict()))
    card = json.loads((tmp_path / "v1" / "card.json").read_text())
    card["weights_sha256"] = None  # even with the checksum out of the way, a pickle is never unpickled
    (tmp_path / "v1" / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelCardError, match="not a safetensors file"):
        load_model(tmp_path / "v1")


def test_folder_with_only_a_pickle_is_refused(tmp_path):
    (tmp_path / "v9").mkdir()
    torch.save({"w": torch.zeros(1)}, tmp_path / "v9" / "model.pt")
    with pytest.raises(ModelCardError, match="pickled weights are never loaded"):
        load_model(tmp_path / "v9")


@pytest.mark.parametrize("field", ["version", "arch", "embedding_dim", "classes", "space", "compatible_with"])
def test_card_missing_a_field_is_refused(tmp_path, field):
    _save(tmp_path / "v1")
    path = tmp_path / "v1" / "card.json"
    card = json.loads(path.read_text())
    del card[field]
    path.write_text(json.dumps(card))
    with pytest.raises(ModelCardError, match=field):
        read_card(tmp_path / "v1")


def test_tampered_or_mismatched_folders_are_refused(tmp_path):
    _save(tmp_path / "v1")
    (tmp_path / "v1" / "card.json").write_text("{not json")
    with pytest.raises(ModelCardError, match="not valid JSON"):
        load_model(tmp_path / "v1")
    _save(tmp_path / "v2")
    (tmp_path / "v2").rename(tmp_path / "renamed")
    with pytest.raises(ModelCardError, match="folder is named"):
        load_model(tmp_path / "renamed")
    _save(tmp_path / "v3")
    w = tmp_path / "v3" / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ModelCardError, match="checksum"):
        load_model(tmp_path / "v3")


def test_weights_that_do_not_fit_the_card_are_refused(tmp_path):
    _save(tmp_path / "v1")
    path = tmp_path / "v1" / "card.json"
    card = json.loads(path.read_text())
    card["arch"]["width"] = 16
    path.write_text(json.dumps(card))
    with pytest.raises(ModelCardError, match="does not fit the architecture"):
        load_model(tmp_path / "v1")
