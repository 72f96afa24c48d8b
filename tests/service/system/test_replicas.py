"""Two ``graceful serve`` replicas on one PostgreSQL database and one data dir (each with its own index
dir): every write and activation made through one is served by the other within a second; a replica
killed with SIGKILL during ingest loses nothing acknowledged while the other keeps answering; simultaneous
activations end with one active version everywhere."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import _database_url
from tests.support.payloads import H, item_payload
from tests.support.servers import RealServer

BOUND_S = 1.0  # the propagation bound


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Only PostgreSQL: replicas are several processes on one database server."""
    yield from _database_url(request.param, tmp_path)


@pytest.fixture
def replicas(server_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[[str], RealServer]]:
    """``make(name)``: a replica with its own index dir and log, sharing models, data dir and database."""
    models = Path(server_env["GRACEFUL_MODELS_DIR"])
    shutil.copytree(models / "v2", models / "v3")  # a second BCT child of v1 (same weights, its own name)
    card = json.loads((models / "v3" / "card.json").read_text())
    (models / "v3" / "card.json").write_text(json.dumps({**card, "version": "v3"}))
    made: list[RealServer] = []

    def make(name: str) -> RealServer:
        env = {**server_env, "GRACEFUL_INDEX_DIR": str(tmp_path / f"index-{name}")}
        s = RealServer(env, tmp_path / f"{name}.log")
        made.append(s)
        return s.start()

    yield make
    for s in made:
        s.close()


def _until(what: Callable[[], Any], bound: float = 5.0) -> float:
    """Seconds until ``what()`` is truthy (polled every 10 ms); fails past ``bound``."""
    t0 = time.monotonic()
    while not what():
        if time.monotonic() - t0 > bound:
            raise AssertionError(f"not within {bound}s")
        time.sleep(0.01)
    return time.monotonic() - t0


def _hits(c: httpx.Client, probe: str) -> list[str]:
    """Ids this replica's FAISS index returns for the stored embedding of ``probe`` (the probe itself is
    left out of its own answer; the test galleries are smaller than k)."""
    r = c.post("/v1/search", json={"item_id": probe, "k": 100})
    return [h["external_id"] for h in r.json()["hits"]] if r.status_code == 200 else []


def _sql(server: RealServer, query: str) -> list[tuple[Any, ...]]:
    """Rows of ``query`` on the replicas' database."""
    from sqlalchemy import text

    from index.db import make_engine

    engine = make_engine(server.env["GRACEFUL_DATABASE_URL"])
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(query))]
    finally:
        engine.dispose()


def _active(c: httpx.Client) -> str:
    return c.get("/v1/models/active").json()["version"]


@pytest.mark.slow
def test_writes_and_activations_propagate_within_a_second(replicas, tiny_test, split) -> None:
    _, g_idx = split
    a, b = replicas("a"), replicas("b")
    ca, cb = a.client, b.client
    waits: dict[str, float] = {}

    r = ca.post("/v1/items", json={"items": item_payload(tiny_test, g_idx[:20], prefix="a")}, headers=H)
    assert r.status_code == 200, r.text
    probe = "a" + str(g_idx[0])
    waits["ingest a->b"] = _until(lambda: "a" + str(g_idx[19]) in _hits(cb, probe))
    r = cb.post("/v1/items", json={"items": item_payload(tiny_test, g_idx[20:30], prefix="b")}, headers=H)
    assert r.status_code == 200, r.text
    waits["ingest b->a"] = _until(lambda: "b" + str(g_idx[29]) in _hits(ca, probe))
    assert (
        ca.get("/v1/index").json()["spaces"][0]["live"]
        == cb.get("/v1/index").json()["spaces"][0]["live"]
        == 30
    )

    victim = "a" + str(g_idx[3])
    assert victim in _hits(cb, probe)
    assert ca.delete(f"/v1/items/{victim}", headers=H).status_code in (200, 204)
    waits["delete a->b"] = _until(lambda: victim not in _hits(cb, probe))

    assert ca.post("/v1/models/v2/activate", headers=H).status_code == 200
    waits["activate a->b"] = _until(lambda: _active(cb) == "v2")
    # every response names the version that embedded its query: b's searches now say v2
    r = cb.post("/v1/search", json={"image_base64": item_payload(tiny_test, [g_idx[0]])[0]["image_base64"]})
    assert r.json()["model_version"] == "v2"
    assert cb.post("/v1/models/rollback", headers=H).status_code == 200
    waits["rollback b->a"] = _until(lambda: _active(ca) == "v1")
    r = ca.post("/v1/search", json={"image_base64": item_payload(tiny_test, [g_idx[0]])[0]["image_base64"]})
    assert r.json()["model_version"] == "v1"

    slow = {k: round(v, 3) for k, v in waits.items() if v > BOUND_S}
    assert not slow, f"propagation slower than {BOUND_S}s: {slow} (all: {waits})"


@pytest.mark.slow
def test_a_replica_killed_during_ingest_loses_nothing_and_the_other_keeps_answering(
    replicas, tiny_test, split
) -> None:
    _, g_idx = split
    a, b = replicas("a"), replicas("b")
    images = [int(i) for i in g_idx[:40]]
    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    failures: list[str] = []  # answers from the surviving replica that were not 200
    answered = [0]

    def ingester(server: RealServer, tag: str) -> None:
        with httpx.Client(base_url=server.url, timeout=30, headers=H) as c:
            r = 0
            while not stop.is_set():
                items = item_payload(tiny_test, [images[(r + j) % len(images)] for j in range(8)])
                for j, it in enumerate(items):
                    it["external_id"] = f"{tag}-r{r}-{j}"
                try:
                    resp = c.post("/v1/items", json={"items": items})
                except httpx.HTTPError:
                    return  # its replica died under it
                if resp.status_code == 200:
                    with lock:
                        acked.extend(it["external_id"] for it in items)
                elif server is b:
                    failures.append(f"ingest {resp.status_code}")
                r += 1

    def searcher() -> None:
        query = {"image_base64": item_payload(tiny_test, [images[0]])[0]["image_base64"], "k": 5}
        with httpx.Client(base_url=b.url, timeout=30) as c:
            while not stop.is_set():
                resp = c.post("/v1/search", json=query)
                if resp.status_code != 200:
                    failures.append(f"search {resp.status_code}")
                answered[0] += 1

    threads = [
        threading.Thread(target=ingester, args=(a, "a0")),
        threading.Thread(target=ingester, args=(a, "a1")),
        threading.Thread(target=ingester, args=(b, "b0")),
        threading.Thread(target=searcher),
    ]
    for t in threads:
        t.start()
    _until(lambda: len(acked) >= 200, bound=60)
    a.kill()  # SIGKILL mid-ingest: whatever a had in flight is cut
    before = answered[0]
    time.sleep(1.0)  # b keeps taking writes and searches meanwhile
    stop.set()
    for t in threads:
        t.join(30)
    assert answered[0] > before, "the surviving replica stopped answering"
    assert not failures, failures[:5]

    cb = b.client
    _until(lambda: cb.get("/readyz").status_code == 200)
    time.sleep(0.5)  # one follow interval past the last write
    lost = [e for e in acked if cb.get(f"/v1/items/{e}").status_code != 200]
    assert not lost, f"{len(lost)} acknowledged items lost, e.g. {lost[:5]}"
    # b's index holds exactly what the database holds (a's acknowledged and unacknowledged commits too)
    live = cb.get("/v1/index").json()["spaces"][0]["live"]
    assert live == _sql(b, "SELECT count(*) FROM embeddings")[0][0]


@pytest.mark.slow
def test_simultaneous_activations_end_with_one_active_version_everywhere(replicas) -> None:
    a, b = replicas("a"), replicas("b")
    for round_, (va, vb) in enumerate([("v2", "v3"), ("v3", "v2"), ("v1", "v2"), ("v2", "v1")]):
        go = threading.Barrier(2)
        codes: dict[str, int] = {}

        def activate(server: RealServer, version: str, name: str, go=go, codes=codes) -> None:
            with httpx.Client(base_url=server.url, timeout=60, headers=H) as c:
                go.wait()
                codes[name] = c.post(f"/v1/models/{version}/activate").status_code

        ts = [
            threading.Thread(target=activate, args=(a, va, "a")),
            threading.Thread(target=activate, args=(b, vb, "b")),
        ]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert set(codes.values()) == {200}, (round_, codes)
        (winner,) = _sql(a, "SELECT value FROM settings WHERE key = 'active_version'")[0]
        assert winner in (va, vb)
        _until(lambda w=winner: _active(a.client) == _active(b.client) == w, bound=BOUND_S)
        marked = [v for (v,) in _sql(a, "SELECT version FROM model_versions WHERE status = 'active'")]
        assert marked == [winner], (round_, marked, winner)
        for c in (a.client, b.client):
            listed = c.get("/v1/models").json()
            assert listed["active"] == winner
