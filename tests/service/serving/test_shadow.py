"""Shadow traffic: a candidate answers a share of live searches beside the active model, for comparison."""

from __future__ import annotations

import time

import numpy as np

from service.images import encode_png_base64
from tests.support.payloads import H, item_payload


def test_shadow_compares_without_changing_the_answers(make_server, tiny_test, split):
    q_idx, g_idx = split
    server = make_server().start()
    c = server.client
    assert c.post("/v1/items", json={"items": item_payload(tiny_test, g_idx)}, headers=H).status_code == 200
    assert c.get("/v1/models/v2/shadow").status_code == 404  # none running
    assert c.post("/v1/models/v2/shadow", json={"fraction": 1.0}).status_code == 401  # needs the key
    assert c.post("/v1/models/v2/shadow", json={"fraction": 0}, headers=H).status_code == 422
    assert (
        c.post("/v1/models/v1/shadow", json={"fraction": 1.0}, headers=H).status_code == 422
    )  # the active one
    r = c.post("/v1/models/v2/shadow", json={"fraction": 1.0}, headers=H)
    assert r.status_code == 200 and r.json()["running"] is True, r.text
    for i in q_idx[:20]:
        ans = c.post(
            "/v1/search", json={"image_base64": encode_png_base64(tiny_test.images[i]), "k": 10}
        ).json()
        assert ans["model_version"] == "v1"  # clients are answered by the active model only
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = c.get("/v1/models/v2/shadow").json()
        if st["compared"] + st["dropped"] + st["failed"] >= 20:
            break
        time.sleep(0.05)
    assert st["offered"] == 20 and st["failed"] == 0 and st["compared"] >= 1, st
    assert 0.0 <= st["overlap_at_10"] <= 1.0 and 0.0 <= st["lost_top1"] <= 1.0
    assert st["latency_ms"]["p99"] >= st["latency_ms"]["p50"] > 0
    final = c.delete("/v1/models/v2/shadow", headers=H).json()
    assert final["running"] is False and final["compared"] == st["compared"]
    assert c.get("/v1/models/v2/shadow").status_code == 404


def test_offers_are_dropped_first_when_live_searches_wait(tiny_models, tmp_path):
    from index import Gallery
    from service.models.cache import ModelCache
    from service.models.hot_swap import HotSwap
    from service.models.registry import ModelRegistry
    from service.serving.shadow import ShadowTraffic

    with Gallery.open(None, tmp_path / "data") as gallery:
        registry = ModelRegistry(tiny_models, gallery)
        registry.scan()
        models = ModelCache(registry)
        swap = HotSwap(registry, models)
        swap.activate("v1")
        shadow = ShadowTraffic(gallery, swap, models, max_queue=2)
        try:
            shadow.start("v2", 1.0)
            image = np.zeros((1, 28, 28), np.uint8)
            for _ in range(5):
                shadow.offer(image, None, ["a"], busy=True)  # live searches waiting: never queued
            st = shadow.status("v2")
            assert st["offered"] == 5 and st["dropped"] == 5 and st["compared"] == 0
        finally:
            shadow.close()
