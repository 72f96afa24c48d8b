"""Findings of an adversarial probe, each pinned: bounded multipart bodies, ids that round-trip, 4xx (never
500) for hostile JSON and path parameters, slow-header connections closed, an honest rollback after a
cross-space swap, a blobs folder that comes back, no source bytes kept for what is not stored, no local
paths in error details, and a backfill that re-embedded nothing does not say ``done``."""

from __future__ import annotations

import base64
import hashlib
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from service.console.local_server import LocalServer
from service.images import encode_png_base64
from tests.support.payloads import API_KEY, item_payload

H = {"X-API-Key": API_KEY}


def _multipart(
    parts: list[tuple[str, str | None, bytes]], boundary: str = "abuse0boundary"
) -> tuple[bytes, dict]:
    """A raw multipart body of ``(field name, file name or None, content)`` parts (built by hand: fast)."""
    out = []
    for name, filename, content in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out.append(f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + content + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), {"content-type": f"multipart/form-data; boundary={boundary}"}


def _blob_files(data_dir: Path) -> list[Path]:
    root = data_dir / "blobs"
    return (
        sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
        if root.exists()
        else []
    )


def _blob_of(b64: str, data_dir: Path) -> Path:
    digest = hashlib.sha256(base64.b64decode(b64)).hexdigest()
    return data_dir / "blobs" / digest[:2] / digest


def _wait_job(c, job_id: int, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = c.get(f"/v1/backfill/{job_id}").json()
        if job["status"] not in ("pending", "running"):
            return job
        assert time.monotonic() < deadline, f"timed out waiting: {job}"
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------- finding 1
def test_multipart_search_with_many_parts_is_refused_fast_and_healthz_stays_responsive(make_server):
    server = make_server().start()
    c = server.client
    body, headers = _multipart([("image", f"{i}.png", b"x") for i in range(10_000)])
    worst: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            assert c.get("/healthz").status_code == 200
            worst.append(time.perf_counter() - t0)
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        t0 = time.perf_counter()
        r = c.post("/v1/search", content=body, headers=headers)  # no API key: search is open
        took = time.perf_counter() - t0
    finally:
        stop.set()
        poller.join()
    assert r.status_code in (413, 422), r.text
    assert "at most 1 file" in r.json()["detail"], r.text
    assert r.headers.get("connection") == "close"  # the rest of such a body is never read
    assert took < 2.0, f"refusing 10,000 parts took {took:.2f}s"
    assert max(worst) < 1.0, f"/healthz took up to {max(worst):.2f}s meanwhile"
    # too many plain fields are bounded as well
    body, headers = _multipart([("image", "q.png", b"x")] + [(f"f{i}", None, b"1") for i in range(5_000)])
    r = c.post("/v1/search", content=body, headers=headers)
    assert r.status_code in (413, 422) and "at most 8 fields" in r.json()["detail"], r.text


def test_multipart_ingest_parts_are_bounded_by_the_batch_limit(make_server, tiny_test):
    server = make_server(GRACEFUL_MAX_BATCH_ITEMS="4").start()
    c = server.client
    png = base64.b64decode(encode_png_base64(tiny_test.images[0]))
    body, headers = _multipart([("files", f"a{i}.png", png) for i in range(5)])
    r = c.post("/v1/items", content=body, headers={**headers, **H})
    assert r.status_code == 413 and "at most 4 files" in r.json()["detail"], r.text
    body, headers = _multipart([("files", f"a{i}.png", png) for i in range(4)])
    r = c.post("/v1/items", content=body, headers={**headers, **H})
    assert r.status_code == 200, r.text
    assert c.get("/v1/items/a3").status_code == 200


# ---------------------------------------------------------------------------------------------- finding 2
def test_external_id_with_a_slash_is_refused_and_its_url_is_a_clean_404(make_server, tiny_test, tmp_path):
    server = make_server().start()
    c = server.client
    b64 = encode_png_base64(tiny_test.images[0])
    r = c.post("/v1/items", json={"items": [{"external_id": "a/b", "image_base64": b64}]}, headers=H)
    assert r.status_code == 422 and "'/'" in r.json()["detail"], r.text
    png = base64.b64decode(b64)
    body, headers = _multipart([("files", "x.png", png), ("external_id", None, b"a/b")])
    r = c.post("/v1/items", content=body, headers={**headers, **H})
    assert r.status_code == 422 and "'/'" in r.json()["detail"], r.text
    assert _blob_files(tmp_path / "data") == []
    for method in ("get", "delete"):
        r = getattr(c, method)("/v1/items/a%2Fb", headers=H)
        assert r.status_code == 404, (method, r.text)
        assert isinstance(r.json()["detail"], str)
    assert c.get("/v1/index").status_code == 200
    assert sum(s["live"] for s in c.get("/v1/index").json()["spaces"]) == 0


# ---------------------------------------------------------------------------------------------- finding 3
def test_hostile_json_and_path_parameters_get_4xx_not_500(make_server, tiny_test):
    server = make_server().start()
    c = server.client
    js = {"content-type": "application/json"}
    r = c.post("/v1/search", content=b'{"item_id": "\\ud800"}', headers=js)
    assert r.status_code == 422 and "surrogate" in r.json()["detail"], r.text
    b64 = encode_png_base64(tiny_test.images[0])
    body = b'{"items": [{"external_id": "x\\udc00", "image_base64": "' + b64.encode() + b'"}]}'
    r = c.post("/v1/items", content=body, headers={**js, **H})
    assert r.status_code == 422 and "surrogate" in r.json()["detail"], r.text
    # a valid pair is fine
    r = c.post("/v1/search", content=b'{"item_id": "\\ud83d\\ude00"}', headers=js)
    assert r.status_code == 404, r.text
    for depth in (990, 100_000):
        deep = b'{"vector": ' + b"[" * depth + b"]" * depth + b', "model_version": "v1"}'
        r = c.post("/v1/search", content=deep, headers=js)
        assert r.status_code == 422 and "nested" in r.json()["detail"], (depth, r.text)
        deep = (
            b'{"items": [{"external_id": "d", "image_base64": "AA", "metadata": '
            + b'{"a": ' * depth
            + b"1"
            + b"}" * depth
            + b"}]}"
        )
        r = c.post("/v1/items", content=deep, headers={**js, **H})
        assert r.status_code == 422 and "nested" in r.json()["detail"], (depth, r.text)
    r = c.post("/v1/models/" + "v" * 5000 + "/activate", headers=H)
    assert 400 <= r.status_code < 500 and "version" in r.json()["detail"], r.text
    assert c.get("/v1/models/active").json()["version"] == "v1"
    assert c.get("/healthz").status_code == 200


# ---------------------------------------------------------------------------------------------- finding 4
@pytest.mark.slow
def test_connections_that_never_finish_their_headers_are_closed(tiny_models, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    env = {
        "GRACEFUL_MODELS_DIR": str(models),
        "GRACEFUL_DATA_DIR": str(tmp_path / "data"),
        "GRACEFUL_ACTIVE_MODEL": "v1",
        "GRACEFUL_TORCH_THREADS": "1",
        "GRACEFUL_HTTP_HEADER_TIMEOUT_S": "2",
        "GRACEFUL_HTTP_BODY_TIMEOUT_S": "2",
    }
    server = LocalServer(env, tmp_path / "server.log").start()
    socks: list[socket.socket] = []
    try:
        for i in range(50):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            if i % 5:  # most send a partial request line and headers, some send nothing at all
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            socks.append(s)
        # complete headers, then a body that never finishes: 408, and the connection closes
        trickle = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        trickle.sendall(
            b"POST /v1/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"item_id": '
        )
        socks.append(trickle)
        import httpx

        with httpx.Client(base_url=server.url, timeout=5) as c:
            end = time.monotonic() + 4.0  # the timeout (2 s) and a margin
            while time.monotonic() < end:
                t0 = time.perf_counter()
                assert c.get("/healthz").status_code == 200
                assert time.perf_counter() - t0 < 1.0
                time.sleep(0.2)
        answer = trickle.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 2 s" in answer, answer
        closed = 0
        for s in socks:
            s.settimeout(3)
            try:
                while data := s.recv(4096):  # the 408 of the trickled body, then the close
                    assert s is trickle, data
                closed += 1
            except ConnectionResetError:
                closed += 1
            except TimeoutError:
                pass
        assert closed == len(socks), f"{len(socks) - closed} of {len(socks)} slow connections are still open"
    finally:
        for s in socks:
            s.close()
        server.kill()


# ---------------------------------------------------------------------------------------------- finding 5
@pytest.mark.slow
def test_rollback_after_a_cross_space_swap_says_how_and_works_after_a_backfill(make_server, tiny_test, split):
    server = make_server().start()
    c = server.client
    _, g_idx = split
    r = c.post("/v1/items", json={"items": item_payload(tiny_test, g_idx[:20])}, headers=H)
    assert r.status_code == 200, r.text
    job = c.post("/v1/backfill", json={"candidate": "v2-indep"}, headers=H).json()
    assert _wait_job(c, job["id"])["status"] == "done"
    r = c.post("/v1/models/v2-indep/activate", headers=H)
    assert r.status_code == 200, r.text
    note = r.json()["rollback"]
    assert (
        note and "backfill" in note["note"] and note["backfill_report"] == "/v1/backfill/report?candidate=v1"
    )
    new = item_payload(tiny_test, g_idx[20:21], prefix="new")
    assert c.post("/v1/items", json={"items": new}, headers=H).status_code == 200
    r = c.post("/v1/models/rollback", headers=H)
    assert r.status_code == 409, r.text
    detail = r.json()["detail"]
    assert new[0]["external_id"] in detail and "POST /v1/backfill" in detail and '"candidate": "v1"' in detail
    job = c.post("/v1/backfill", json={"candidate": "v1"}, headers=H)
    assert job.status_code == 202, job.text
    assert _wait_job(c, job.json()["id"])["status"] == "done"
    r = c.post("/v1/models/rollback", headers=H)
    assert r.status_code == 200 and r.json()["active"] == "v1", r.text
    # a same-space activation says nothing about rollback: there is nothing to prepare
    r = c.post("/v1/models/v2/activate", headers=H)
    assert r.status_code == 200 and r.json()["rollback"] is None, r.text


# ---------------------------------------------------------------------------------------------- finding 6
def test_ingest_recreates_a_blobs_folder_removed_while_serving(make_server, tiny_test, tmp_path):
    server = make_server().start()
    c = server.client
    assert c.post("/v1/items", json={"items": item_payload(tiny_test, [0])}, headers=H).status_code == 200
    shutil.rmtree(tmp_path / "data" / "blobs")
    payload = item_payload(tiny_test, [1])
    r = c.post("/v1/items", json={"items": payload}, headers=H)
    assert r.status_code == 200, r.text
    assert _blob_of(payload[0]["image_base64"], tmp_path / "data").is_file()


# ---------------------------------------------------------------------------------------------- finding 7
def test_no_source_bytes_are_kept_for_refused_ingests_or_deleted_items(make_server, tiny_test, tmp_path):
    server = make_server().start()
    c = server.client
    data = tmp_path / "data"
    good = item_payload(tiny_test, [0, 1, 2])
    bad = {"external_id": "bad", "image_base64": base64.b64encode(b"junk").decode()}
    # refused: one undecodable image among good ones (422)
    r = c.post("/v1/items", json={"items": [good[0], bad]}, headers=H)
    assert r.status_code == 422, r.text
    # refused: an item with an unreadable image in a multipart body (422)
    body, headers = _multipart(
        [("files", "m1.png", base64.b64decode(good[1]["image_base64"])), ("files", "m2.png", b"junk")]
    )
    assert c.post("/v1/items", content=body, headers={**headers, **H}).status_code == 422
    assert _blob_files(data) == []
    # refused: an id that is already stored (409): the new bytes go, the stored item's stay
    assert c.post("/v1/items", json={"items": [good[0]]}, headers=H).status_code == 200
    assert _blob_files(data) == [_blob_of(good[0]["image_base64"], data)]
    dup = {**good[1], "external_id": good[0]["external_id"]}
    r = c.post("/v1/items", json={"items": [good[2], dup]}, headers=H)
    assert r.status_code == 409, r.text
    same_bytes = {**good[0], "external_id": "g0-again"}
    assert c.post("/v1/items", json={"items": [same_bytes, good[0]]}, headers=H).status_code == 409
    assert _blob_files(data) == [_blob_of(good[0]["image_base64"], data)]
    # DELETE removes the item's bytes
    assert c.delete(f"/v1/items/{good[0]['external_id']}", headers=H).status_code == 200
    assert _blob_files(data) == []
    # two items with the same bytes share a blob: it goes with the last of them
    twins = [{**good[1], "external_id": "twin1"}, {**good[1], "external_id": "twin2"}]
    assert c.post("/v1/items", json={"items": twins}, headers=H).status_code == 200
    blob = _blob_of(good[1]["image_base64"], data)
    assert _blob_files(data) == [blob]
    assert c.delete("/v1/items/twin1", headers=H).status_code == 200
    assert blob.is_file()
    assert c.delete("/v1/items/twin2", headers=H).status_code == 200
    assert not blob.exists()
    # an upsert that replaces an item's bytes drops the old ones
    assert c.post("/v1/items", json={"items": [good[2]]}, headers=H).status_code == 200
    replaced = {**good[1], "external_id": good[2]["external_id"]}
    assert c.post("/v1/items", json={"items": [replaced], "upsert": True}, headers=H).status_code == 200
    assert _blob_files(data) == [_blob_of(good[1]["image_base64"], data)]


# ---------------------------------------------------------------------------------------------- finding 8
def test_error_details_do_not_show_the_models_dir(make_server, tmp_path):
    broken = tmp_path / "models" / "broken"
    broken.mkdir()
    (broken / "card.json").write_text('{"version": "broken"}')
    server = make_server().start()
    c = server.client
    secret = str(tmp_path)
    answers = [
        c.post("/v1/models/broken/activate", headers=H),
        c.post("/v1/models/nothere/activate", headers=H),
        c.post("/v1/backfill", json={"candidate": "broken"}, headers=H),
        c.get("/v1/backfill/report", params={"candidate": "broken"}),
        c.get("/v1/models"),
    ]
    for r in answers[:4]:
        assert 400 <= r.status_code < 500, r.text
    for r in answers:
        assert secret not in r.text, r.text
    listed = {m["version"]: m for m in answers[4].json()["models"]}
    assert listed["broken"]["valid"] is False and "card.json" in listed["broken"]["error"]


def test_a_backfill_that_re_embedded_nothing_does_not_end_done(make_server, tiny_test, tmp_path):
    server = make_server().start()
    c = server.client
    payload = item_payload(tiny_test, [0, 1, 2])
    assert c.post("/v1/items", json={"items": payload}, headers=H).status_code == 200
    # nothing pending: done
    job = c.post("/v1/backfill", json={"candidate": "v1"}, headers=H).json()
    assert _wait_job(c, job["id"])["status"] == "done"
    for p in payload:  # every source is lost
        _blob_of(p["image_base64"], tmp_path / "data").unlink()
    job = c.post("/v1/backfill", json={"candidate": "v2"}, headers=H).json()
    job = _wait_job(c, job["id"])
    assert job["status"] != "done", job
    assert job["skipped"] == 3
    assert "no item had a usable source (3 skipped)" in (job["error"] or ""), job
