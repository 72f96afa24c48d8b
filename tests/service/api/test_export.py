"""GET /v1/gallery/sources/export: a seeded sample of the kept sources as a ZIP with a manifest.

One module-scoped gallery of 20 items with a kept source (19 PNG, 1 JPEG) and 5 ingested while
GRACEFUL_KEEP_SOURCES was off: the same seed gives the same archive, another seed other files, a sample of
at least the count gives them all, the 5 are skipped and counted, bounds answer 422, a gallery with
nothing to export 409, and the export changes nothing stored.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from service.export import MANIFEST, sample_kept
from tests.support.payloads import API_KEY, H, item_payload
from tests.support.servers import InProcessServer
from trainer.data import Dataset

URL = "/v1/gallery/sources/export"
PLAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
KEPT, NOT_KEPT = 20, 5


def _jpeg_item(ds: Dataset, i: int) -> dict:
    img = ds.images[i]
    buf = io.BytesIO()
    Image.fromarray(img[0] if img.ndim == 3 else img).save(buf, format="JPEG", quality=90)
    return {"external_id": "photo jpeg", "image_base64": base64.b64encode(buf.getvalue()).decode()}


@pytest.fixture(scope="module")
def env(
    tiny_models: Path, module_database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    root = tmp_path_factory.mktemp("export")
    shutil.copytree(tiny_models, root / "models")
    return {
        "GRACEFUL_MODELS_DIR": str(root / "models"),
        "GRACEFUL_DATA_DIR": str(root / "data"),
        "GRACEFUL_DATABASE_URL": module_database_url,
        "GRACEFUL_API_KEY": API_KEY,
        "GRACEFUL_ACTIVE_MODEL": "v1",
        "GRACEFUL_TORCH_THREADS": "1",
        "GRACEFUL_CHECK_SAMPLE": "0",
    }


@pytest.fixture(scope="module")
def server(env: dict[str, str], tiny_test: Dataset, split) -> Iterator[InProcessServer]:
    """20 items ingested with their sources kept, then 5 more by the same gallery reopened with
    GRACEFUL_KEEP_SOURCES off."""
    _, gallery = split
    s = InProcessServer(env).start()
    try:
        items = item_payload(tiny_test, gallery[: KEPT - 1]) + [_jpeg_item(tiny_test, int(gallery[KEPT]))]
        r = s.client.post("/v1/items", json={"items": items}, headers=H)
        assert r.status_code == 200, r.text
    finally:
        s.close()
    s = InProcessServer({**env, "GRACEFUL_KEEP_SOURCES": "false"}).start()
    try:
        more = item_payload(tiny_test, gallery[KEPT + 1 : KEPT + 1 + NOT_KEPT], prefix="nokeep")
        r = s.client.post("/v1/items", json={"items": more}, headers=H)
        assert r.status_code == 200, r.text
        yield s
    finally:
        s.close()


def _export(server: InProcessServer, sample: int, seed: int = 0) -> tuple[bytes, dict, dict[str, bytes]]:
    """(the raw answer, the manifest, file name -> bytes of every other member)."""
    r = server.client.get(URL, params={"sample": sample, "seed": seed})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    assert r.headers["content-disposition"].startswith("attachment")
    assert int(r.headers["content-length"]) == len(r.content)
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        assert zf.testzip() is None
        names = zf.namelist()
        assert len(names) == len(set(names))
        assert all(PLAIN.match(n) for n in names), names  # no folders, no "..", nothing to escape into
        members = {n: zf.read(n) for n in names}
    manifest = json.loads(members.pop(MANIFEST))
    return r.content, manifest, members


def test_archive_holds_the_kept_sources_and_a_manifest(server: InProcessServer) -> None:
    _, m, members = _export(server, sample=6, seed=3)
    assert m["seed"] == 3 and m["sample"] == 6 and m["written"] == 6 == len(members)
    assert m["items"] == KEPT + NOT_KEPT and m["with_source"] == KEPT and m["without_source"] == NOT_KEPT
    assert m["missing_from_store"] == 0
    for f in m["files"]:
        image = server.client.get(f"/v1/items/{quote(f['external_id'], safe='')}/image")
        assert members[f["file"]] == image.content  # the bytes it was ingested with
        assert f["file"] == f"{f['item_id']}.{'jpg' if f['media_type'] == 'image/jpeg' else 'png'}"
        assert f["embedded_by"] == {"v1": "v1"} and f["bytes"] == len(image.content)
        assert not f["external_id"].startswith("nokeep")


def test_same_seed_same_archive_other_seed_other_files(server: InProcessServer) -> None:
    raw_a, m_a, _ = _export(server, sample=5, seed=11)
    raw_b, _, _ = _export(server, sample=5, seed=11)
    assert raw_a == raw_b  # byte for byte: entries carry a fixed date
    _, m_c, _ = _export(server, sample=5, seed=12)
    assert {f["file"] for f in m_a["files"]} != {f["file"] for f in m_c["files"]}
    # the documented draw: items with a source sorted by item id, default_rng(seed).choice
    ids = sorted(f["item_id"] for f in _export(server, sample=KEPT)[1]["files"])
    sources = [(i, f"e{i}", "blob:x") for i in ids] + [(10_000, "none", None)]
    assert [f["item_id"] for f in m_a["files"]] == [i for i, _, _ in sample_kept(sources, 5, 11)]
    expected = np.sort(np.random.default_rng(11).choice(KEPT, size=5, replace=False))
    assert [f["item_id"] for f in m_a["files"]] == [ids[j] for j in expected]


def test_sample_of_at_least_the_count_gives_every_kept_source(server: InProcessServer) -> None:
    _, m, members = _export(server, sample=1000, seed=0)
    assert m["written"] == KEPT == len(members)
    assert m["without_source"] == NOT_KEPT  # skipped, counted
    assert sorted(n.rsplit(".", 1)[1] for n in members).count("jpg") == 1
    assert {f["external_id"] for f in m["files"]} >= {"photo jpeg"}  # named by item id, not by this


@pytest.mark.parametrize(
    "params, words",
    [
        ({"sample": 0}, "GRACEFUL_EXPORT_MAX_SAMPLE"),
        ({"sample": -3}, "GRACEFUL_EXPORT_MAX_SAMPLE"),
        ({"sample": 50_001}, "GRACEFUL_EXPORT_MAX_SAMPLE"),
        ({"sample": "many"}, "sample"),
        ({}, "sample"),
        ({"sample": 3, "seed": -1}, "seed"),
    ],
)
def test_bounds_answer_422(server: InProcessServer, params: dict, words: str) -> None:
    r = server.client.get(URL, params=params)
    assert r.status_code == 422, r.text
    assert words in r.json()["detail"]


def test_export_changes_nothing_stored(
    server: InProcessServer, env: dict[str, str], tiny_test, split
) -> None:
    q_idx, _ = split
    query = item_payload(tiny_test, [int(q_idx[0])])[0]["image_base64"]
    blobs = Path(env["GRACEFUL_DATA_DIR"]) / "blobs"

    def state() -> tuple:
        items = server.client.get("/v1/items", params={"limit": 1000}).json()
        hits = server.client.post("/v1/search", json={"image_base64": query, "k": 10}).json()["hits"]
        files = sorted((p.name, p.stat().st_mtime_ns) for p in blobs.rglob("*") if p.is_file())
        return items, hits, files

    before = state()
    for seed in range(3):
        _export(server, sample=7, seed=seed)
    assert state() == before


def test_nothing_to_export_answers_409(make_server, tiny_test: Dataset, split) -> None:
    _, gallery = split
    s = make_server(GRACEFUL_KEEP_SOURCES="false").start()
    r = s.client.get(URL, params={"sample": 5})
    assert r.status_code == 409 and "no items" in r.json()["detail"]
    r = s.client.post("/v1/items", json={"items": item_payload(tiny_test, gallery[:3])}, headers=H)
    assert r.status_code == 200, r.text
    r = s.client.get(URL, params={"sample": 5})
    assert r.status_code == 409, r.text
    assert "kept source" in r.json()["detail"] and "GRACEFUL_KEEP_SOURCES" in r.json()["detail"]


def test_a_lower_max_sample_is_the_bound(make_server) -> None:
    s = make_server(GRACEFUL_EXPORT_MAX_SAMPLE="10").start()
    r = s.client.get(URL, params={"sample": 11})
    assert r.status_code == 422 and "between 1 and 10" in r.json()["detail"]
