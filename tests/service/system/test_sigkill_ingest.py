"""Fault: SIGKILL the server (a real uvicorn process) while clients ingest (and search) at full speed, then restart it on the same
data. Every acknowledged item is there, every request is all-or-nothing, and the index equals the database."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.support.payloads import H, item_payload


@pytest.mark.slow
def test_sigkill_during_ingest_loses_no_acknowledged_item(make_real_server, tiny_test, split):
    q_idx, g_idx = split
    server = make_real_server().start()
    images = [int(i) for i in g_idx[:40]]
    acked: list[list[str]] = []
    sent: list[list[str]] = []  # every request sent, acknowledged or not
    lock = threading.Lock()
    stop = threading.Event()
    per_request = 12

    def ingester(n: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30, headers=H) as c:
            r = 0
            while not stop.is_set():
                ids = [f"c{n}-r{r}-{j}" for j in range(per_request)]
                items = item_payload(tiny_test, [images[(r + j) % len(images)] for j in range(per_request)])
                for it, eid in zip(items, ids, strict=True):
                    it["external_id"] = eid
                with lock:
                    sent.append(ids)
                try:
                    resp = c.post("/v1/items", json={"items": items})
                except httpx.HTTPError:
                    return  # the server died under us
                assert resp.status_code == 200, resp.text
                with lock:
                    acked.append(ids)
                r += 1

    def searcher() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while not stop.is_set():
                try:
                    c.post("/v1/search", json={"item_id": "c0-r0-0", "k": 5})
                except httpx.HTTPError:
                    return

    threads = [threading.Thread(target=ingester, args=(n,)) for n in range(4)] + [
        threading.Thread(target=searcher)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acked) < 30 and time.monotonic() < deadline:  # well into the load, writes in flight
        time.sleep(0.05)
    server.kill()  # SIGKILL: no shutdown, no snapshot, whatever was in flight is cut
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acked) >= 30, "the load never got going"

    server = make_real_server().start()
    c = server.client
    acked_ids = {e for ids in acked for e in ids}
    present = set()
    for ids in sent:  # each request all or nothing; every acknowledged one complete
        got = [c.get(f"/v1/items/{e}").status_code for e in ids]
        assert set(got) <= {200, 404}
        assert len(set(got)) == 1, (ids[0], got)  # a request is never half stored
        if got[0] == 200:
            present.update(ids)
    missing = acked_ids - present
    assert not missing, f"{len(missing)} acknowledged items lost, e.g. {sorted(missing)[:5]}"
    # index == DB: FAISS holds exactly the stored items, and finds them
    spaces = {s["space"]: s for s in c.get("/v1/index").json()["spaces"]}
    items_in_db = float(
        next(
            ln.split()[-1]
            for ln in c.get("/metrics").text.splitlines()
            if ln.startswith("graceful_gallery_items ")
        )
    )
    assert spaces["v1"]["live"] == items_in_db == len(present)
    some = sorted(acked_ids)[-1]
    r = c.post("/v1/search", json={"item_id": some, "k": 3})
    assert r.status_code == 200 and len(r.json()["hits"]) == 3
    # and it keeps working: a new ingest after the restart is acknowledged and found
    r = c.post(
        "/v1/items", json={"items": item_payload(tiny_test, [int(q_idx[0])], prefix="after")}, headers=H
    )
    assert r.status_code == 200, r.text
    assert c.get("/v1/index").json()["spaces"][0]["live"] == len(present) + 1
