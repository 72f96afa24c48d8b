"""The Python client (service.console.client.GracefulClient) and the `graceful ingest | search | --version`
verbs, against an in-process server (the client sends through its TestClient) and, for the retries, a mock
transport: every image form is accepted, folders are ingested with ids from their paths, bad files fail
alone, 503 and refused connections are retried with backoff a bounded number of times and nothing else is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.console import items as items_cli
from service.console.cli import main as cli_main
from service.console.client import ApiError, GracefulClient, encode_image, external_id_for, image_files
from tests.support.payloads import API_KEY


def _save(path: Path, image: np.ndarray, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[0] if image.ndim == 3 else image).save(path, format=fmt)
    return path


@pytest.fixture
def server(make_server):
    return make_server().start()


@pytest.fixture
def client(server) -> GracefulClient:
    return GracefulClient(server.url, API_KEY, http_client=server.client)


@pytest.fixture
def folder(tmp_path: Path, tiny_test, split) -> Path:
    """tiny test images as PNG, JPEG and WebP files in nested folders, and files to skip."""
    _, g_idx = split
    root = tmp_path / "photos"
    for n, i in enumerate(g_idx[:24]):
        sub, fmt, ext = [("", "PNG", ".png"), ("cats", "JPEG", ".jpg"), ("cats/old", "WEBP", ".webp")][n % 3]
        _save(root / sub / f"img{n:02d}{ext}", tiny_test.images[i], fmt)
    (root / "notes.txt").write_text("not an image")
    return root


def test_image_forms_all_encode_to_the_same_search(
    client: GracefulClient, server, tiny_test, split, tmp_path
) -> None:
    q_idx, g_idx = split
    client.ingest(
        [f"g{i}" for i in g_idx[:30]],
        tiny_test.images[g_idx[:30]],
        [{"label": int(tiny_test.labels[i])} for i in g_idx[:30]],
    )
    img = tiny_test.images[q_idx[0]]
    img = img[0] if img.ndim == 3 else img  # (28, 28) uint8
    path = _save(tmp_path / "q.png", img)
    webp = _save(tmp_path / "q.webp", img, "WEBP")
    forms = [img, img[None], str(path), path, path.read_bytes(), Image.fromarray(img), webp.read_bytes()]
    answers = [client.search(f, k=5) for f in forms]
    assert all(
        [h["external_id"] for h in a["hits"]] == [h["external_id"] for h in answers[0]["hits"]]
        for a in answers[:-1]
    )
    assert len(answers[-1]["hits"]) == 5  # WebP (lossy) converted to PNG on the way
    assert client.search_image(img, k=5)["hits"] == answers[0]["hits"]
    rgb = np.repeat(img[None], 3, axis=0)
    assert encode_image(rgb).startswith(b"\x89PNG") and encode_image(rgb.transpose(1, 2, 0)).startswith(
        b"\x89PNG"
    )
    for bad in (img.astype(np.float32), np.zeros((2, 2, 2, 2), np.uint8), 3.5):
        with pytest.raises((ValueError, TypeError)):
            encode_image(bad)


def test_search_by_vector_item_filter_and_many(client: GracefulClient, tiny_test, split, server) -> None:
    q_idx, g_idx = split
    ids = [f"g{i}" for i in g_idx[:40]]
    client.ingest(
        ids,
        tiny_test.images[g_idx[:40]],
        [{"label": int(tiny_test.labels[i]), "n": n} for n, i in enumerate(g_idx[:40])],
    )
    label = int(tiny_test.labels[g_idx[0]])
    got = client.search(tiny_test.images[q_idx[1]], k=40, filter={"label": label})
    assert got["hits"] and all(h["metadata"]["label"] == label for h in got["hits"])
    assert len(got["hits"]) == sum(int(tiny_test.labels[i]) == label for i in g_idx[:40])
    by_item = client.search(item_id=ids[3], k=4, filter={"n": {"in": [1, 2, 5, 7, 9]}})
    assert {h["external_id"] for h in by_item["hits"]} <= {ids[n] for n in (1, 2, 5, 7, 9)}
    vec, _ = server.app.state.parts.gallery.get_embedding(ids[5], "v1")
    by_vec = client.search(vector=vec, model_version="v1", k=1)
    assert by_vec["hits"][0]["external_id"] == ids[5]
    with pytest.raises(ValueError):
        client.search(k=3)
    with pytest.raises(ValueError):
        client.search(vector=vec, k=3)
    many = client.search_many(
        [tiny_test.images[q_idx[i % len(q_idx)]] for i in range(70)] + [{"item_id": ids[0], "k": 2}],
        k=3,
        filter={"label": label},
    )
    assert len(many) == 71 and len(many[-1]["hits"]) == 2  # two requests (64 + 7)
    alone = client.search(tiny_test.images[q_idx[5]], k=3, filter={"label": label})
    assert [h["external_id"] for h in many[5]["hits"]] == [h["external_id"] for h in alone["hits"]]
    assert [h["score"] for h in many[5]["hits"]] == pytest.approx(
        [h["score"] for h in alone["hits"]], abs=1e-5
    )
    with pytest.raises(ApiError) as e:
        client.search(item_id=ids[0], filter={"label": [1]})
    assert e.value.status == 422 and "filter" in e.value.detail


def test_items_scroll_get_patch_delete(client: GracefulClient, tiny_test, split) -> None:
    _, g_idx = split
    ids = [f"g{i}" for i in g_idx[:25]]
    client.ingest(ids, tiny_test.images[g_idx[:25]])
    assert sorted(it["external_id"] for it in client.scroll(limit=4)) == sorted(ids)
    got = client.get_items([ids[0], "nope", ids[1]])
    assert [it["external_id"] for it in got["items"]] == [ids[0], ids[1]] and got["missing"] == ["nope"]
    assert client.patch_metadata(ids[0], {"a": 1, "b": 2})["metadata"] == {"a": 1, "b": 2}
    assert client.patch_metadata(ids[0], {"a": None})["metadata"] == {"b": 2}
    assert client.patch_metadata(ids[0], {"c": 3}, merge=False)["metadata"] == {"c": 3}
    assert client.get_item(ids[0])["metadata"] == {"c": 3}
    assert client.delete([ids[0], "nope"]) == {"deleted": [ids[0]], "missing": ["nope"]}
    assert client.delete(ids[1]) == {"deleted": [ids[1]], "missing": []}
    assert len(list(client.scroll())) == 23
    with pytest.raises(ApiError) as e:
        client.get_item(ids[0])
    assert e.value.status == 404
    no_key = GracefulClient(client.url, None, http_client=client.http)
    with pytest.raises(ApiError) as e:
        no_key.delete([ids[2]])
    assert e.value.status == 401


def test_models_activate_rollback_and_backfill_wait(client: GracefulClient, tiny_test, split) -> None:
    _, g_idx = split
    client.ingest([f"g{i}" for i in g_idx[:20]], tiny_test.images[g_idx[:20]])
    assert client.active()["version"] == "v1"
    assert {m["version"] for m in client.models()["models"]} >= {"v1", "v2", "v2-indep"}
    assert client.check("v2")["method"] == "card"  # the tests' servers run with the check off
    assert client.activate("v2")["active"] == "v2"
    assert client.rollback()["active"] == "v1"
    assert client.activate("v2", force=True)["forced"] is False  # nothing failed, nothing overridden
    assert client.rollback()["active"] == "v1"
    job = client.backfill_start("v2", batch_size=8)
    done = client.backfill_wait(job["id"], progress=True, poll=0.05, timeout=120)
    assert done["status"] == "done" and done["done"] == 20


def test_ingest_folder_ids_from_paths_and_bad_files_fail_alone(
    client: GracefulClient, folder: Path, tmp_path
) -> None:
    _save(folder / "cats" / "big.png", np.zeros((1100, 1000), np.uint8))  # over the pixel bound: refused
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")  # refused by the server
    _save(folder / "img00.jpg", np.zeros((28, 28), np.uint8), "JPEG")  # same id as img00.png
    summary = client.ingest_folder(folder, metadata={"source": "test"}, batch=5, progress=False)
    assert summary.files == 27
    failed = {Path(f).name: reason for f, reason in summary.failed}
    assert set(failed) == {"big.png", "broken.png", "img00.png"}, summary.failed
    assert "GRACEFUL_MAX_IMAGE_PIXELS" in failed["big.png"] and "also the id of" in failed["img00.png"]
    assert len(summary.stored) == 24 and summary.versions == {"v1": 24}
    assert (
        "cats__img01" in summary.stored and "cats__old__img02" in summary.stored and "img00" in summary.stored
    )
    item = client.get_item("cats__old__img02")
    assert item["metadata"] == {"source": "test"} and item["has_source"]
    assert summary.line().startswith("ingested 24 of 27 files") and "3 failed" in summary.line()
    # again: every id exists, so each file is refused (409) unless upsert
    again = client.ingest_folder(folder, batch=50, progress=False)
    assert not again.stored and len(again.failed) == 27
    assert len(client.ingest_folder(folder, upsert=True, batch=50, progress=False).stored) == 24
    assert external_id_for(folder / "a" / "b" / "c.png", folder) == "a__b__c"
    with pytest.raises(FileNotFoundError):
        image_files([tmp_path / "missing"])


# ---------------------------------------------------------------------------------------------- retries


def _mock(statuses: list[int | type[Exception]], seen: list[str]) -> httpx.Client:
    answers = iter(statuses)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path} {request.headers.get('x-api-key')}")
        nxt = next(answers)
        if isinstance(nxt, type):
            raise nxt("boom", request=request)
        return httpx.Response(
            nxt,
            json={"detail": f"status {nxt}"} if nxt >= 400 else {"ok": True},
            headers={"retry-after": "0.5"} if nxt == 503 else {},
        )

    return httpx.Client(base_url="http://mock", transport=httpx.MockTransport(handler))


def _client(statuses, seen, **kw) -> tuple[GracefulClient, list[float]]:
    c = GracefulClient("http://mock", "k", http_client=_mock(statuses, seen), **kw)
    sleeps: list[float] = []
    c.sleep = sleeps.append
    return c, sleeps


def test_503_and_refused_connections_are_retried_with_backoff_then_succeed() -> None:
    seen: list[str] = []
    c, sleeps = _client([503, httpx.ConnectError, 503, 200], seen, retries=4, backoff=0.1, max_backoff=1.0)
    assert c.post("/v1/items", json={}) == {"ok": True}
    assert len(seen) == 4 and all(s == "POST /v1/items k" for s in seen)
    assert sleeps == [0.5, 0.2, 0.5]  # Retry-After (0.5) when larger, else 0.1 * 2**attempt


def test_retries_are_bounded_and_other_errors_are_never_retried() -> None:
    seen: list[str] = []
    c, sleeps = _client([503] * 3, seen, retries=2, backoff=0.01)
    with pytest.raises(ApiError) as e:
        c.get("/v1/models")
    assert e.value.status == 503 and len(seen) == 3 and len(sleeps) == 2
    for status in (400, 401, 404, 409, 422, 500, 504):
        seen.clear()
        c, sleeps = _client([status, 200], seen, retries=5)
        with pytest.raises(ApiError) as e:
            c.post("/v1/search", json={})
        assert (
            e.value.status == status
            and e.value.detail == f"status {status}"
            and len(seen) == 1
            and not sleeps
        )
    seen.clear()
    c, _ = _client([httpx.ConnectError] * 2, seen, retries=1)
    with pytest.raises(httpx.ConnectError):
        c.get("/healthz")
    assert len(seen) == 2
    # a read error may come after the server did the work: a POST is not sent again, a GET is
    seen.clear()
    c, _ = _client([httpx.ReadError, 200], seen, retries=3)
    with pytest.raises(httpx.ReadError):
        c.post("/v1/items", json={})
    assert len(seen) == 1
    seen.clear()
    c, _ = _client([httpx.ReadError, 200], seen, retries=3)
    assert c.get("/v1/items") == {"ok": True} and len(seen) == 2
    with pytest.raises(ValueError):
        GracefulClient("http://x", retries=-1)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_ingest_and_search_print_a_summary_and_ranked_hits(
    server, folder, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(
        items_cli, "_client", lambda args: GracefulClient(server.url, API_KEY, http_client=server.client)
    )
    rc = items_cli.ingest_main(
        [str(folder), "--metadata-json", '{"shelf": "A1"}', "--batch", "7", "--no-progress"]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert out.out.strip().startswith("ingested 24 of 24 files") and "by v1" in out.out
    query = folder / "img00.png"
    rc = items_cli.search_main(
        [str(query), "--k", "3", "--filter", "shelf=A1", "--filter", "nope=1", "--filter", "nope=2"]
    )
    out = capsys.readouterr()
    assert rc == 0 and out.out.startswith("0 hits; query embedded by v1")
    rc = items_cli.search_main([str(query), "--k", "3", "--filter", "shelf=A1"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and out[0] == "3 hits; query embedded by v1 (space v1)"
    assert out[1].split() == ["rank", "external_id", "score", "embedded_by"]
    assert out[2].split()[:2] == ["1", "img00"] and out[2].split()[-1] == "v1"
    assert float(out[2].split()[2]) == pytest.approx(1.0, abs=1e-3)
    rc = items_cli.search_main(["--item", "img00", "--k", "2", "--json"])
    answer = json.loads(capsys.readouterr().out)
    assert rc == 0 and len(answer["hits"]) == 2 and "img00" not in [h["external_id"] for h in answer["hits"]]
    assert items_cli.parse_filters(["a=3", "b=true", "c=x", 'd="3"', "e=1", "e=2.5"]) == {
        "a": 3,
        "b": True,
        "c": "x",
        "d": "3",
        "e": {"in": [1, 2.5]},
    }


@pytest.mark.parametrize(
    ("argv", "rc", "words"),
    [
        (["search", "missing.png"], 2, "no such file"),
        (["search"], 2, "IMAGE or --item"),
        (["search", "--item", "x", "--filter", "nokey"], 2, "KEY=VALUE"),
        (["ingest", "missing-dir"], 2, "no such file or folder"),
        (["ingest", "{folder}", "--metadata-json", "[1]"], 2, "JSON object"),
        (["ingest", "{folder}", "--metadata-json", "{bad"], 2, "not valid JSON"),
        (
            ["ingest", "{folder}", "--api", "http://127.0.0.1:9", "--retries", "0", "--no-progress"],
            1,
            "cannot reach",
        ),
        (
            ["search", "{folder}/img00.png", "--api", "http://127.0.0.1:9", "--retries", "0"],
            1,
            "cannot reach",
        ),
    ],
)
def test_cli_bad_input_is_one_line_on_stderr(argv, rc, words, folder, capsys) -> None:
    argv = [a.replace("{folder}", str(folder)) for a in argv]
    assert cli_main(argv) == rc
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and err[0].startswith("graceful "), err


def test_cli_version_and_refusals_from_the_service(server, folder, monkeypatch, capsys) -> None:
    assert cli_main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    from importlib.metadata import version

    assert out == f"graceful {version('graceful')}"
    monkeypatch.setattr(
        items_cli, "_client", lambda args: GracefulClient(server.url, API_KEY, http_client=server.client)
    )
    assert items_cli.search_main(["--item", "no-such-item"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "404" in err[0] and "no-such-item" in err[0]


@pytest.mark.slow
def test_graceful_ingest_and_search_against_a_real_server(make_real_server, folder, tmp_path) -> None:
    """The installed console script, in a child process, over real HTTP."""
    server = make_real_server().start()
    env = {
        "GRACEFUL_API_URL": server.url,
        "GRACEFUL_API_KEY": API_KEY,
        "PATH": str(Path(sys.executable).parent),
    }
    cmd = [sys.executable, "-m", "service.console.cli"]
    r = subprocess.run(
        [*cmd, "ingest", str(folder), "--no-progress"], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ingested 24 of 24 files")
    r = subprocess.run(
        [*cmd, "search", str(folder / "cats" / "img01.jpg"), "--k", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[2].split()[1] == "cats__img01"


def test_evaluate_keeps_each_querys_top1_hit_for_retrieval_flips(monkeypatch) -> None:
    # Three queries against a gallery of four labelled items; the stub answers each query's ranking.
    c = GracefulClient("http://mock", "k", http_client=httpx.Client(base_url="http://mock"))
    label_of = {"a": 0, "b": 0, "c": 1, "d": 1}
    rankings = [["c", "a", "b", "d"], ["c", "d", "a", "b"], ["a", "c", "d", "b"]]

    def search_image(image, k, include_metadata=False):
        return {"model_version": "v1", "hits": [{"external_id": e} for e in rankings[int(image[0, 0, 0])]]}

    monkeypatch.setattr(c, "search_image", search_image)
    images = np.arange(3, dtype=np.uint8).reshape(3, 1, 1, 1)
    ev = c.evaluate(images, np.array([0, 1, 1]), label_of, k=4, threads=2)
    assert ev.top1_hits is not None and ev.top1_hits.tolist() == [False, True, False]
    assert ev.metrics["top1"] == pytest.approx(1 / 3) and ev.versions == {"v1": 3}
