"""Refused model folders are never loaded or registered: bad cards, weights that fail their checksum or do not
fit the architecture, pickles, links out of the models dir; each refusal says why."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from index import Gallery
from service.errors import InvalidModel, ModelNotFound
from service.models import cache as cache_mod
from service.models.cache import ModelCache
from service.models.hot_swap import HotSwap
from service.models.registry import ModelRegistry


def _rewrite_card(folder: Path, **changes) -> None:
    card = json.loads((folder / "card.json").read_text())
    card.update(changes)
    (folder / "card.json").write_text(json.dumps(card))


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _bad_folders(models: Path, outside: Path) -> dict[str, str]:
    """Make refused model folders next to the good ones; returns version -> words its refusal must say."""

    def clone(name: str, src: str = "v1") -> Path:
        shutil.copytree(models / src, models / name)
        _rewrite_card(models / name, version=name)
        return models / name

    clone("not-json").joinpath("card.json").write_text("{ not json")
    _rewrite_card(clone("no-space"), space=None)
    f = clone("flipped")  # one byte of the weights changed: the card's checksum no longer matches
    raw = bytearray((f / "weights.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (f / "weights.safetensors").write_bytes(bytes(raw))
    f = clone("other-arch")  # v2's weights (another width) with a checksum forged to match them
    shutil.copy(models / "v2" / "weights.safetensors", f / "weights.safetensors")
    _rewrite_card(f, weights_sha256=_sha(f / "weights.safetensors"))
    f = clone("pickled")  # a pickle named like safetensors, checksum forged
    (f / "weights.safetensors").write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    _rewrite_card(f, weights_sha256=_sha(f / "weights.safetensors"))
    _rewrite_card(clone("unverifiable"), weights_sha256=None)
    f = clone("linked-weights")
    shutil.copy(f / "weights.safetensors", outside / "w.safetensors")
    (f / "weights.safetensors").unlink()
    (f / "weights.safetensors").symlink_to(outside / "w.safetensors")
    shutil.copytree(models / "v1", outside / "escaped")  # a valid model, but outside the models dir
    _rewrite_card(outside / "escaped", version="escaped")
    (models / "escaped").symlink_to(outside / "escaped", target_is_directory=True)
    return {
        "not-json": "not valid JSON",
        "no-space": "space",
        "flipped": "checksum",
        "other-arch": "does not fit the architecture",
        "pickled": "not a safetensors file",
        "unverifiable": "weights_sha256",
        "linked-weights": "link",
        "escaped": "outside the models dir",
    }


def test_refused_model_folders_are_never_loaded_or_registered(tiny_models, tmp_path, monkeypatch):
    models, outside = tmp_path / "models", tmp_path / "outside"
    shutil.copytree(tiny_models, models)
    outside.mkdir()
    bad = _bad_folders(models, outside)
    loaded: list[str] = []
    real_load = cache_mod.load_model
    monkeypatch.setattr(
        cache_mod, "load_model", lambda folder: loaded.append(Path(folder).name) or real_load(folder)
    )
    with Gallery.open(None, tmp_path / "data") as g:
        reg = ModelRegistry(models, g)
        swap = HotSwap(reg, ModelCache(reg))
        entries = {e.version: e for e in reg.scan()}
        for version, words in bad.items():
            assert entries[version].card is None and words in entries[version].error, (
                version,
                entries[version].error,
            )
            with pytest.raises(InvalidModel, match="refused"):
                swap.activate(version)
        assert {e.version for e in entries.values() if e.card} == {"v1", "v2", "v2-indep"}
        assert {v.version for v in g.list_versions()} == {
            "v1",
            "v2",
            "v2-indep",
        }  # nothing refused was registered
        assert loaded == []  # nothing was loaded: refusals happen when the folder is read
        with pytest.raises(ModelNotFound):
            swap.activate("../outside/escaped")
        swap.activate("v1")
        assert loaded == ["v1"]
