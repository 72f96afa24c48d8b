"""Micro-batching: grouping, bounds, waiting only for announced requests, deadlines, and the hot-swap
guarantee over HTTP (every answer names the model that really embedded its query)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.errors import Overloaded, RequestTimeout
from service.images import encode_png_base64
from service.serving.batching import MicroBatcher
from service.serving.deadlines import deadline_in, result_within
from tests.support.payloads import API_KEY, item_payload
from trainer.artifact import embed_images, load_model


class Key:
    """A key equal to every other by value: batches must still group by identity (like ActiveModel)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Key)

    def __hash__(self) -> int:
        return 0


def _recorder(delay: float = 0.0):
    calls: list[tuple[object, list]] = []
    gate = threading.Event()
    gate.set()

    def run(key, payloads):
        gate.wait(10)
        calls.append((key, list(payloads)))
        time.sleep(delay)
        return [(key, p) for p in payloads]

    return run, calls, gate


def test_groups_by_key_identity_in_order_within_bounds():
    run, calls, gate = _recorder()
    b = MicroBatcher("t", run, max_size=4, max_wait_s=0.0, max_queue=100).start()
    try:
        gate.clear()  # hold the worker on the first job so the others queue up behind it
        first = b.submit("warm", 0)
        time.sleep(0.05)
        a, c = Key(), Key()
        futures = [(k, i, b.submit(k, i)) for i, k in enumerate([a, c, a, a, c, a, c, a], start=1)]
        gate.set()
        assert first.result(5) == ("warm", 0)
        for k, i, f in futures:
            key, payload = f.result(5)
            assert key is k and payload == i
    finally:
        b.close()
    later = calls[1:]
    assert all(len(p) <= 4 for _, p in later)
    assert sum(len(p) for _, p in later) == 8
    for key, payloads in later:  # one group = one key object, payloads in submission order
        assert payloads == sorted(payloads)
        assert all(k is key for k, i, _ in futures if i in payloads)
    assert len(later) >= 3  # 8 jobs of two keys in batches of at most 4


def test_size_of_bounds_the_summed_size_and_a_big_job_runs_alone():
    run, calls, gate = _recorder()
    b = MicroBatcher("t", run, max_size=10, max_wait_s=0.0, max_queue=100, size_of=len).start()
    try:
        gate.clear()
        b.submit("k", "x")
        time.sleep(0.05)
        fs = [b.submit("k", p) for p in ["aaaa", "bbbb", "cccc", "d" * 25, "ee"]]
        gate.set()
        for f in fs:
            f.result(5)
    finally:
        b.close()
    sizes = [sum(len(p) for p in ps) for _, ps in calls[1:]]
    assert ["d" * 25] in [ps for _, ps in calls]
    assert all(s <= 10 for s, (_, ps) in zip(sizes, calls[1:], strict=True) if len(ps) > 1)


def test_waits_only_while_requests_are_announced():
    run, calls, _ = _recorder()
    b = MicroBatcher("t", run, max_size=8, max_wait_s=1.0, max_queue=100).start()
    try:
        t0 = time.perf_counter()
        b.submit("k", 1).result(5)
        assert time.perf_counter() - t0 < 0.5  # nobody announced: no reason to wait the full second

        with b.announce():  # another request is on its way: the batch waits for it (up to max_wait)
            f1 = b.submit("k", 2)
            time.sleep(0.1)
            f2 = b.submit("k", 3)
        assert f1.result(5) and f2.result(5)
        assert calls[-1][1] == [2, 3]
    finally:
        b.close()


def test_errors_reach_their_own_requests():
    def run(key, payloads):
        if key == "boom":
            raise ValueError("whole group")
        return [ValueError(f"bad {p}") if p < 0 else p for p in payloads]

    b = MicroBatcher("t", run, max_size=8, max_wait_s=0.0, max_queue=100).start()
    try:
        assert b.submit("k", 1).result(5) == 1
        with pytest.raises(ValueError, match="bad -1"):
            b.submit("k", -1).result(5)
        with pytest.raises(ValueError, match="whole group"):
            b.submit("boom", 1).result(5)
        assert b.submit("k", 2).result(5) == 2  # the worker survived
    finally:
        b.close()


def test_full_queue_is_refused_not_queued():
    run, _, gate = _recorder()
    b = MicroBatcher("t", run, max_size=1, max_wait_s=0.0, max_queue=2).start()
    try:
        gate.clear()
        b.submit("k", 0)
        time.sleep(0.05)  # the worker holds job 0; two more fill the queue
        b.submit("k", 1)
        b.submit("k", 2)
        with pytest.raises(Overloaded, match="limit 2"):
            b.submit("k", 3)
    finally:
        gate.set()
        b.close()


def test_deadline_cancels_queued_work_and_reports_running_work():
    ran: list[int] = []
    hold = threading.Event()

    def run(key, payloads):
        ran.extend(payloads)
        hold.wait(5)
        return payloads

    b = MicroBatcher("t", run, max_size=1, max_wait_s=0.0, max_queue=10).start()
    try:
        running = b.submit("k", 1)
        time.sleep(0.05)
        queued = b.submit("k", 2)

        async def both():
            r1 = result_within(running, deadline_in(0.1), "job 1", outcome_if_late="it may finish")
            r2 = result_within(queued, deadline_in(0.1), "job 2", outcome_if_late="-")
            return await asyncio.gather(r1, r2, return_exceptions=True)

        e1, e2 = asyncio.run(both())
        assert isinstance(e1, RequestTimeout) and "it may finish" in str(e1)
        assert isinstance(e2, Overloaded) and "nothing was done" in str(e2)
        hold.set()
        assert running.result(5) == 1
        time.sleep(0.1)
        assert ran == [1]  # the cancelled job never ran
    finally:
        hold.set()
        b.close()


@pytest.mark.slow
def test_batched_answers_name_the_model_that_embedded_them_during_swaps(
    make_server, tiny_models, tiny_test, split
):
    """Concurrent image searches (batched) while v1 and v2 swap: each answer's hits and scores equal brute
    force with the model its ``model_version`` names, so no query was embedded by another model."""
    q_idx, g_idx = split
    g_idx = g_idx[:120]
    server = make_server(GRACEFUL_BATCH_MAX_WAIT_MS="5").start()
    r = server.client.post(
        "/v1/items", json={"items": item_payload(tiny_test, g_idx)}, headers={"X-API-Key": API_KEY}
    )
    assert r.status_code == 200, r.text
    models = {v: load_model(tiny_models / v) for v in ("v1", "v2")}
    gallery = embed_images(models["v1"], tiny_test.images[g_idx])
    queries = list(q_idx[:16])
    q_emb = {v: embed_images(m, tiny_test.images[queries]) for v, m in models.items()}
    payloads = [
        {"image_base64": encode_png_base64(tiny_test.images[i]), "k": 5, "include_metadata": False}
        for i in queries
    ]
    stop = threading.Event()
    answers: list[tuple[int, dict]] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        with server.connect() as c:
            i = n
            while not stop.is_set():
                r = c.post("/v1/search", json=payloads[i % len(payloads)])
                with lock:
                    if r.status_code == 200:
                        answers.append((i % len(payloads), r.json()))
                    else:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                i += 1

    with ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(client, n) for n in range(8)]
        try:
            for n in range(8):
                r = server.client.post(
                    f"/v1/models/{'v2' if n % 2 == 0 else 'v1'}/activate", headers={"X-API-Key": API_KEY}
                )
                assert r.status_code == 200, r.text
                time.sleep(0.2)
        finally:
            stop.set()
            for f in futs:
                f.result()
    assert failures == []
    versions = {a["model_version"] for _, a in answers}
    assert versions == {"v1", "v2"}, versions
    for qi, a in answers:
        sims = gallery @ q_emb[a["model_version"]][qi]
        got = [h["external_id"] for h in a["hits"]]
        np.testing.assert_allclose([h["score"] for h in a["hits"]], np.sort(sims)[::-1][:5], atol=1e-4)
        assert set(got) <= {
            f"g{g}" for g, s in zip(g_idx, sims, strict=True) if s >= np.sort(sims)[-5] - 1e-4
        }
    batches = server.client.get("/metrics").text
    assert 'graceful_batch_size_count{queue="search"}' in batches
    # Batching happened: fewer forwards than queries.
    count = float(
        next(
            ln.split()[-1]
            for ln in batches.splitlines()
            if ln.startswith('graceful_batch_size_count{queue="search"}')
        )
    )
    assert count < len(answers)
