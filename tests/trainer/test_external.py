"""External model versions: a card without weights, written by `graceful register-external`; loading gives a
model that refuses to embed images, and only an external card may leave out arch and classes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.console.cli import main as graceful
from trainer import NoImageModel
from trainer.artifact import CARD_FILE, ExternalModel, embed_images, load_model, random_twin, read_card
from trainer.errors import ConfigError, ModelCardError
from trainer.external import register_external
from trainer.verify import verify_weights


def test_register_external_writes_a_card_that_loads_without_weights(tmp_path) -> None:
    card = register_external(tmp_path / "ext1", 16, space="v1", compatible_with="v1", classes=[0, 1])
    folder = tmp_path / "ext1"
    assert sorted(p.name for p in folder.iterdir()) == [CARD_FILE]
    raw = json.loads((folder / CARD_FILE).read_text())
    assert raw["format"] == "external" and raw["embedding_dim"] == 16 and raw["space"] == "v1"
    assert "weights" not in raw and "weights_sha256" not in raw  # it has none
    assert read_card(folder) == card and card.external and card.compatible_with == "v1"
    verify_weights(folder, card)  # nothing to verify: no error
    loaded = load_model(folder)
    assert isinstance(loaded.model, ExternalModel) and loaded.card.external
    assert random_twin(loaded) is None
    with pytest.raises(NoImageModel, match="ext1 is external.*send vectors"):
        embed_images(loaded, np.zeros((2, 1, 28, 28), np.uint8))
    with pytest.raises(NoImageModel):
        loaded.model.classify(None)


def test_register_external_defaults_to_its_own_space_and_no_classes(tmp_path) -> None:
    card = register_external(tmp_path / "ext2", 8)
    assert card.space == "ext2" and card.compatible_with is None and card.classes == []


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"dim": 0}, "--dim must be 1-65536"),
        ({"dim": 70000}, "--dim must be 1-65536"),
        ({"dim": 8, "space": "a/b"}, "--space 'a/b'"),
        ({"dim": 8, "compatible_with": ""}, "--compatible-with"),
    ],
)
def test_register_external_refuses_bad_arguments(tmp_path, kwargs, words) -> None:
    with pytest.raises(ConfigError, match=words):
        register_external(tmp_path / "ext", **kwargs)
    assert not (tmp_path / "ext").exists()


def test_register_external_never_overwrites_a_model_version(tmp_path) -> None:
    register_external(tmp_path / "ext", 8)
    before = (tmp_path / "ext" / CARD_FILE).read_text()
    with pytest.raises(ConfigError, match="already holds a model version"):
        register_external(tmp_path / "ext", 16)
    assert (tmp_path / "ext" / CARD_FILE).read_text() == before


def test_cli_register_external(tmp_path, capsys) -> None:
    out = tmp_path / "models" / "team-v1"
    assert graceful(["register-external", "--out", str(out), "--dim", "32", "--classes", "0-4"]) == 0
    assert "wrote external version team-v1" in capsys.readouterr().out
    card = read_card(out)
    assert card.external and card.embedding_dim == 32 and card.classes == [0, 1, 2, 3, 4]
    assert graceful(["register-external", "--out", str(out), "--dim", "32"]) == 2
    assert "already holds a model version" in capsys.readouterr().err
    assert graceful(["register-external", "--out", str(tmp_path / "x"), "--dim", "many"]) == 2
    assert "--dim" in capsys.readouterr().err
    assert graceful(["register-external", "--out", str(tmp_path / "bad name!"), "--dim", "8"]) == 2
    assert "bad model version name" in capsys.readouterr().err


def _write(folder, card: dict) -> None:
    folder.mkdir()
    (folder / CARD_FILE).write_text(json.dumps(card))


def test_a_hand_written_external_card_needs_no_arch_nor_classes(tmp_path) -> None:
    _write(
        tmp_path / "e",
        {"format": "external", "version": "e", "embedding_dim": 4, "space": "e", "compatible_with": None},
    )
    card = read_card(tmp_path / "e")
    assert card.external and card.arch == {} and card.classes == []


def test_only_an_external_card_may_leave_out_classes_or_arch(tmp_path) -> None:
    base = {"version": "m", "embedding_dim": 4, "space": "m", "compatible_with": None}
    _write(tmp_path / "m", {**base, "arch": {"embedding_dim": 4}, "classes": []})
    with pytest.raises(ModelCardError, match="classes required"):
        read_card(tmp_path / "m")
    (tmp_path / "m" / CARD_FILE).write_text(json.dumps({**base, "classes": [0]}))
    with pytest.raises(ModelCardError, match="arch required"):
        read_card(tmp_path / "m")


def test_an_external_card_cannot_be_an_adapter(tmp_path) -> None:
    _write(
        tmp_path / "e",
        {
            "format": "external",
            "version": "e",
            "embedding_dim": 4,
            "space": "v1",
            "compatible_with": "v1",
            "adapter_of": "v2",
        },
    )
    with pytest.raises(ModelCardError, match="cannot be an adapter"):
        read_card(tmp_path / "e")


def test_an_unknown_format_is_refused(tmp_path) -> None:
    _write(
        tmp_path / "e",
        {"format": "externally", "version": "e", "embedding_dim": 4, "space": "e", "compatible_with": None},
    )
    with pytest.raises(ModelCardError, match="unknown card format 'externally'"):
        read_card(tmp_path / "e")
