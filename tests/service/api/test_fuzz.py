"""Fuzzing the HTTP API from its own OpenAPI spec (schemathesis): no input gets a 5xx, every 4xx says why.

Every operation of the served ``/openapi.json`` gets a bounded, derandomized number of generated requests,
valid ones (positive) and schema-breaking ones (negative), with the API key so mutating endpoints are reached
past the key check, against an in-process server (the app under a TestClient, its lifespan running) holding a
small gallery; schemathesis's requests are delivered to it by tests.support.fuzz.TestClientSession.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from service.images import encode_png_base64
from tests.support.fuzz import TestClientSession
from tests.support.payloads import API_KEY, H, item_payload

EXAMPLES = 12  # per operation and generation mode: about 500 requests in all, under a minute here
HOT_PATH_EXAMPLES = 40  # ingest and search, where the batching is


def _put_real_images(body, png: str) -> None:
    """Replace generated ``image_base64`` strings (never a decodable image) with a real PNG and bring a
    positive ``k`` within bounds, in place. An ingest item (it has an ``external_id``) becomes an image item:
    the schema allows an image or a vector, and a generated item rarely holds exactly one."""
    if isinstance(body, dict):
        if "external_id" in body:
            body["image_base64"] = png
            body.pop("vector", None)
            body.pop("model_version", None)
        for key, value in body.items():
            if key == "image_base64" and isinstance(value, str):
                body[key] = png
            elif key == "k" and isinstance(value, int | float) and value > 0:
                body[key] = 1 + int(value) % 50  # within GRACEFUL_MAX_K
            else:
                _put_real_images(value, png)
    elif isinstance(body, list):
        for value in body:
            _put_real_images(value, png)


def _check(response, what: str) -> None:
    status = response.status_code
    assert status < 500, f"{what}: {status} {response.text[:300]}"
    if status >= 400:
        try:
            body = response.json()
        except ValueError:
            raise AssertionError(f"{what}: {status} without a JSON body: {response.text[:300]}") from None
        assert isinstance(body, dict) and isinstance(body.get("detail"), str) and body["detail"].strip(), (
            f"{what}: {status} without a message: {response.text[:300]}"
        )


@pytest.mark.slow
def test_fuzzed_requests_get_no_5xx_and_every_4xx_has_a_message(make_server, tiny_test, split):
    q_idx, g_idx = split
    server = make_server(GRACEFUL_MAX_BATCH_ITEMS="16", GRACEFUL_MAX_BODY_BYTES=str(1 << 20)).start()
    r = server.client.post(
        "/v1/items", json={"items": item_payload(tiny_test, g_idx[:16])}, headers={"X-API-Key": API_KEY}
    )
    assert r.status_code == 200, r.text
    png = encode_png_base64(tiny_test.images[q_idx[0]])
    spec = server.client.get("/openapi.json").json()
    schema = schemathesis.openapi.from_dict(spec)
    operations = [op.ok() for op in schema.get_all_operations()]
    assert len(operations) >= 10, [o.label for o in operations]
    session = TestClientSession(server.client)
    seen: dict[str, set[int]] = {}
    failures: list[str] = []

    def fuzz(op, mode: GenerationMode, n: int) -> None:
        @settings(
            max_examples=n,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy(generation_mode=mode), real_images=st.sampled_from([True, True, False]))
        def run(case, real_images: bool) -> None:
            if real_images:  # reach past image decoding: the rest of the body stays fuzzed
                _put_real_images(case.body, png)
            response = case.call(
                base_url=server.url, session=session, headers={"X-API-Key": API_KEY}, timeout=30
            )
            seen.setdefault(op.label, set()).add(response.status_code)
            _check(
                response,
                f"{mode.value} {case.method} {case.formatted_path} "
                f"body={str(case.body)[:200]!r} query={case.query!r}",
            )

        run()

    for op in operations:
        for mode in GenerationMode:
            try:
                fuzz(
                    op,
                    mode,
                    HOT_PATH_EXAMPLES if op.label in ("POST /v1/items", "POST /v1/search") else EXAMPLES,
                )
            except Unsatisfiable:  # nothing to break in this operation (no parameters, no body)
                assert mode is GenerationMode.NEGATIVE, op.label
            except AssertionError as e:  # go on with the other operations: report every finding at once
                failures.append(str(e).splitlines()[0])

    assert failures == [], "\n".join(failures)

    # The fuzzing reached past validation on the hot paths (some 2xx), and the server is still fine.
    assert any(s < 300 for s in seen.get("POST /v1/search", set())), seen
    assert any(s < 300 for s in seen.get("POST /v1/items", set())), seen
    assert server.client.get("/readyz").status_code == 200
    r = server.client.post("/v1/search", json={"item_id": f"g{g_idx[0]}", "k": 3})
    assert r.status_code == 200, r.text


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.slow
def test_hostile_shapes_at_every_operation_get_4xx_with_a_message(make_server, tiny_test, split):
    """The shapes an adversarial probe found (deep nesting, lone surrogates, many multipart parts, huge path
    parameters), sent to every operation of the spec: no 5xx, every 4xx says why."""
    _, g_idx = split
    server = make_server(GRACEFUL_MAX_BATCH_ITEMS="16").start()
    c = server.client
    assert (
        c.post("/v1/items", json={"items": item_payload(tiny_test, g_idx[:4])}, headers=H).status_code == 200
    )
    spec = c.get("/openapi.json").json()
    surrogate = '{"item_id": "\\ud800", "external_ids": ["\\udfff"], "candidate": "\\ud800", "k": 1}'
    parts = [("image", ("q.png", b"x", "image/png")) for _ in range(2000)]
    bodies = {
        "nested 990": _nested(990),
        "nested in a field": '{"items": ' + _nested(990) + "}",
        "lone surrogates": surrogate,
    }
    tried = 0
    for path, ops in spec["paths"].items():
        for method in ops:
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            hostile_path = path
            for name in ("external_id", "version", "space", "job_id"):
                hostile_path = hostile_path.replace(
                    "{" + name + "}", "x" * 5000 if name != "job_id" else "9" * 40
                )
            r = c.request(method.upper(), hostile_path, headers=H)
            _check(r, f"{method} {hostile_path[:60]}... (5,000-character parameter)")
            if method in ("post", "put", "patch"):
                for what, raw in bodies.items():
                    r = c.request(
                        method.upper(),
                        path.replace("{", "").replace("}", ""),
                        content=raw,
                        headers={**H, "content-type": "application/json"},
                    )
                    _check(r, f"{method} {path} ({what})")
                r = c.request(method.upper(), path.replace("{", "").replace("}", ""), files=parts, headers=H)
                _check(r, f"{method} {path} (2,000 multipart parts)")
            tried += 1
    assert tried >= 15
    assert c.get("/readyz").status_code == 200
