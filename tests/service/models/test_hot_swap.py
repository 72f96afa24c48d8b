"""Hot swap under load: clients search without pause while the active model flips back and forth."""

from __future__ import annotations

import threading
from collections import Counter

import httpx
import pytest

from service.images import encode_png_base64
from tests.support.payloads import API_KEY, item_payload


@pytest.mark.slow
def test_swaps_under_load_fail_no_request(make_server, tiny_test, split):
    q_idx, g_idx = split
    server = make_server().start()
    r = server.client.post(
        "/v1/items", json={"items": item_payload(tiny_test, g_idx[:100])}, headers={"X-API-Key": API_KEY}
    )
    assert r.status_code == 200
    queries = [encode_png_base64(tiny_test.images[i]) for i in q_idx[:20]]
    stop = threading.Event()
    versions: Counter[str] = Counter()
    failures: list[str] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        with server.connect() as c:
            i = n
            while not stop.is_set():
                try:
                    r = c.post("/v1/search", json={"image_base64": queries[i % len(queries)], "k": 5})
                    if r.status_code != 200 or len(r.json()["hits"]) != 5:
                        with lock:
                            failures.append(f"{r.status_code} {r.text[:200]}")
                    else:
                        with lock:
                            versions[r.json()["model_version"]] += 1
                except httpx.HTTPError as e:  # a dropped connection is a failed request too
                    with lock:
                        failures.append(repr(e))
                i += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    swaps = 0
    try:
        # At least 12 swaps, and on until the clients have sent enough searches to overlap them: a fixed
        # number of swaps finishes before 50 searches on a busy 2-core machine. Bounded either way.
        for n in range(200):
            with lock:
                done = sum(versions.values())
            if n >= 12 and n % 2 == 0 and done > 50:
                break
            target = "v2" if n % 2 == 0 else "v1"
            r = server.client.post(f"/v1/models/{target}/activate", headers={"X-API-Key": API_KEY})
            assert r.status_code == 200, r.text
            swaps += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert swaps >= 10
    assert failures == []
    assert set(versions) == {"v1", "v2"}, versions
    assert sum(versions.values()) > 50
