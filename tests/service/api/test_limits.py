"""Limits that keep the service up: refused model folders are never loaded, FAISS files are only read from
the service's own data dir, bodies are bounded even without a Content-Length, and a request that cannot be
served in time answers 503 with a message (nothing stored) instead of hanging."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from index import Gallery, NewItem, VersionInfo
from index import snapshot as snapshot_mod
from service.errors import InvalidModel, ModelNotFound
from service.images import encode_png_base64
from service.models import cache as cache_mod
from service.models.cache import ModelCache
from service.models.hot_swap import HotSwap
from service.models.registry import ModelRegistry
from tests.service.conftest import API_KEY, item_payload

H = {"X-API-Key": API_KEY}


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
    return {"not-json": "not valid JSON", "no-space": "space", "flipped": "checksum",
            "other-arch": "does not fit the architecture", "pickled": "not a safetensors file",
            "unverifiable": "weights_sha256", "linked-weights": "link", "escaped": "outside the models dir"}


def test_refused_model_folders_are_never_loaded_or_registered(tiny_models, tmp_path, monkeypatch):
    models, outside = tmp_path / "models", tmp_path / "outside"
    shutil.copytree(tiny_models, models)
    outside.mkdir()
    bad = _bad_folders(models, outside)
    loaded: list[str] = []
    real_load = cache_mod.load_model
    monkeypatch.setattr(cache_mod, "load_model", lambda folder: loaded.append(Path(folder).name) or real_load(folder))
    with Gallery.open(None, tmp_path / "data") as g:
        reg = ModelRegistry(models, g)
        swap = HotSwap(reg, ModelCache(reg))
        entries = {e.version: e for e in reg.scan()}
        for version, words in bad.items():
            assert entries[version].card is None and words in entries[version].error, (version, entries[version].error)
            with pytest.raises(InvalidModel, match="refused"):
                swap.activate(version)
        assert {e.version for e in entries.values() if e.card} == {"v1", "v2", "v2-indep"}
        assert {v.version for v in g.list_versions()} == {"v1", "v2", "v2-indep"}  # nothing refused was registered
        assert loaded == []  # nothing was loaded: refusals happen when the folder is read
        with pytest.raises(ModelNotFound):
            swap.activate("../outside/escaped")
        swap.activate("v1")
        assert loaded == ["v1"]


def _snapshotted_gallery(data: Path) -> np.ndarray:
    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    with Gallery.open(None, data) as g:
        g.register_version(VersionInfo("v", space="v", embedding_dim=8))
        g.add([NewItem(f"i{i}", v) for i, v in enumerate(x)], "v")
        g.snapshot()
    return x


@pytest.mark.parametrize("how", ["file", "dir"])
def test_faiss_files_are_only_read_from_the_own_data_dir(tmp_path, monkeypatch, how):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    x = _snapshotted_gallery(data)
    elsewhere.mkdir()
    if how == "file":  # the index file replaced by a link to a file elsewhere
        shutil.move(data / "index" / "v.faiss", elsewhere / "v.faiss")
        (data / "index" / "v.faiss").symlink_to(elsewhere / "v.faiss")
    else:  # the whole index dir is a link to a folder elsewhere
        shutil.move(data / "index", elsewhere / "index")
        (data / "index").symlink_to(elsewhere / "index", target_is_directory=True)
    read: list[str] = []
    real_read = snapshot_mod.faiss.read_index
    monkeypatch.setattr(snapshot_mod.faiss, "read_index", lambda p, *a: read.append(p) or real_read(p, *a))
    with Gallery.open(None, data) as g:
        assert read == []  # FAISS was never handed the file
        assert [r.snapshot_used for r in g.last_open_reports] == [False]  # rebuilt from SQL instead
        assert g.search("v", x[7], 1)[0][0].external_id == "i7" and g.consistency("v") == (50, 50)


@pytest.mark.slow
def test_body_limit_holds_without_content_length(make_server):
    server = make_server(GRACEFUL_MAX_BODY_BYTES="10000").start()

    def chunks():  # chunked transfer encoding: no Content-Length to check up front
        for _ in range(50):
            yield b"x" * 1000

    r = server.client.post("/v1/items", content=chunks(), headers={**H, "content-type": "application/json"})
    assert r.status_code == 413 and "exceeds the limit of 10000" in r.json()["detail"]
    assert server.client.get("/healthz").status_code == 200


@pytest.mark.slow
def test_requests_past_their_deadline_answer_503_and_store_nothing(make_server, tiny_test, split):
    q_idx, g_idx = split
    server = make_server(GRACEFUL_REQUEST_TIMEOUT_S="0.000001").start()
    c = server.client
    r = c.post("/v1/items", json={"items": item_payload(tiny_test, g_idx[:3])}, headers=H)
    assert r.status_code == 503, r.text
    assert "nothing was done" in r.json()["detail"]
    assert c.get(f"/v1/items/g{g_idx[0]}").status_code == 404
    r = c.post("/v1/search", json={"image_base64": encode_png_base64(tiny_test.images[q_idx[0]])})
    assert r.status_code == 503 and "GRACEFUL_REQUEST_TIMEOUT_S" in r.json()["detail"]
    server.stop()
    server = make_server(GRACEFUL_REQUEST_TIMEOUT_S="30").start()  # the same data with a sane deadline
    assert server.client.post("/v1/items", json={"items": item_payload(tiny_test, g_idx[:3])}, headers=H).status_code == 200
