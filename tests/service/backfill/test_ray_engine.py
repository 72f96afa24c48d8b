"""The Ray engine of backfill jobs (service/backfill/ray_engine.py) on a local Ray cluster this module starts:
the same vectors and counts as the local engine, a worker killed with SIGKILL mid-job costs a retry and embeds
no item twice, and a server without Ray refuses a Ray job saying what to install."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from service.api.error_handlers import status_of
from service.backfill import ray_engine
from service.backfill.ray_engine import EmbedActor, RayAddressRefused, RayOptions, RayUnavailable
from tests.service.backfill.runner_parts import Parts, ingest, open_parts, vec_id_counter, wait_status

REPO = Path(__file__).resolve().parents[3]
CANDIDATE = "v2-indep"  # another space: each item gets one embedding there, its v1 one stays


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A local cluster of 2 CPUs and a small object store, shut down after the module."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")
    ray.init(
        num_cpus=2,
        object_store_memory=200 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
        # the actors unpickle the slow test actor below by reference: they import this module
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}},
    )
    try:
        yield
    finally:
        ray.shutdown()


class SlowActor(EmbedActor):
    """An actor that takes its time per batch, so a kill lands while tasks are in flight."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(0.25)
        return super().__call__(batch)


def _parts(tiny_models: Path, tiny_test, root: Path) -> tuple[Parts, list[str]]:
    parts = open_parts(tiny_models, root)
    eids = ingest(parts, tiny_test, np.arange(len(tiny_test)))
    return parts, eids


def _vectors(parts: Parts, space: str) -> dict[str, np.ndarray]:
    """external id -> its stored vector in ``space``."""
    ids, versions, vecs = parts.gallery.space_embeddings(space)
    names = parts.gallery.items_by_id(ids.tolist())
    assert set(versions) <= {CANDIDATE}
    return {names[int(i)][0]: v for i, v in zip(ids, vecs, strict=True)}


@pytest.mark.slow
def test_ray_engine_writes_what_the_local_engine_writes(
    ray_cluster, tiny_models, tiny_test, tmp_path
) -> None:
    results = {}
    for engine in ("local", "ray"):
        parts, eids = _parts(tiny_models, tiny_test, tmp_path / engine)
        runner = parts.runner(ray=RayOptions(workers=2, chunk_items=120))  # two datasets: a chunk boundary
        runner.start()
        try:
            before = vec_id_counter(parts.gallery)
            job = runner.create(CANDIDATE, engine=engine, batch_size=16)
            job = wait_status(runner, job.id, ("done",))
            assert job["engine"] == engine and job["workers"] == (2 if engine == "ray" else None)
            assert (job["done"], job["total"], job["skipped"]) == (len(eids), len(eids), 0)
            assert job["reembedded"] == len(eids) and job["can_activate"] is True
            assert job["owner"] is None  # released when the job left running
            assert vec_id_counter(parts.gallery) - before == len(eids)  # one write per item
            results[engine] = _vectors(parts, CANDIDATE)
            assert parts.gallery.counts_by_version() == {"v1": len(eids), CANDIDATE: len(eids)}
        finally:
            runner.stop()
            parts.gallery.close()
    assert set(results["ray"]) == set(results["local"]) == set(eids)
    for eid in eids:
        np.testing.assert_allclose(results["ray"][eid], results["local"][eid], atol=1e-6, rtol=0)


def _actor_pids(actor: str = "SlowActor") -> list[int]:
    """Ray Data map workers of ``actor`` started under this process (the test's own cluster), by their
    process title."""
    me = os.getpid()
    parents: dict[int, int] = {}
    titles: dict[int, str] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parents[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
        titles[int(d)] = cmd

    def ours(pid: int) -> bool:
        seen = 0
        while pid > 1 and seen < 50:
            if pid == me:
                return True
            pid, seen = parents.get(pid, 1), seen + 1
        return False

    return [p for p, t in titles.items() if "MapWorker" in t and actor in t and ours(p)]


@pytest.mark.slow
def test_a_worker_killed_mid_job_costs_a_retry_not_a_double_write(
    ray_cluster, tiny_models, tiny_test, tmp_path
) -> None:
    parts, eids = _parts(tiny_models, tiny_test, tmp_path)
    writes: Counter[str] = Counter()
    reembed = parts.gallery.reembed

    def counting(pairs, candidate, **kw):  # every write of the exactly-once path, per item
        out = reembed(pairs, candidate, **kw)
        writes.update(e for e, _ in pairs)
        return out

    parts.gallery.reembed = counting  # type: ignore[method-assign]
    runner = parts.runner(ray=RayOptions(workers=2, actor=SlowActor))
    runner.start()
    try:
        before = vec_id_counter(parts.gallery)
        job = runner.create(CANDIDATE, engine="ray", batch_size=8)
        wait_status(runner, job.id, ("running",))
        deadline = time.monotonic() + 120
        while runner.describe(job.id)["done"] < 16:
            assert time.monotonic() < deadline, runner.describe(job.id)
            time.sleep(0.05)
        pids = _actor_pids()
        assert pids, "no Ray Data map worker found to kill"
        os.kill(pids[0], signal.SIGKILL)
        killed_at = runner.describe(job.id)["done"]
        assert killed_at < len(eids), "the kill came too late to interrupt the job"
        restarted: set[int] = set()  # actor processes started after the kill: the pool recovering
        while runner.describe(job.id)["status"] == "running":
            assert time.monotonic() < deadline + 120, runner.describe(job.id)
            restarted.update(set(_actor_pids()) - set(pids))
            time.sleep(0.2)
        job = wait_status(runner, job.id, ("done",))
        assert restarted, "no actor was restarted after the kill"
    finally:
        runner.stop()
    assert (job["done"], job["skipped"]) == (len(eids), 0)
    assert set(writes) == set(eids) and set(writes.values()) == {1}, "an item was written twice"
    assert vec_id_counter(parts.gallery) - before == len(eids)
    assert parts.gallery.counts_by_version() == {"v1": len(eids), CANDIDATE: len(eids)}
    parts.gallery.close()


def test_a_ray_job_without_ray_is_refused_saying_what_to_install(
    tiny_models, tiny_test, tmp_path, monkeypatch
):
    parts = open_parts(tiny_models, tmp_path)
    monkeypatch.setattr(ray_engine, "ray_installed", lambda: False)
    runner = parts.runner()
    try:
        with pytest.raises(RayUnavailable, match=r"pip install graceful\[ray\]") as e:
            runner.create(CANDIDATE, engine="ray")
        assert status_of(e.value) == 422
        assert parts.gallery.backfill.list_jobs() == []
    finally:
        parts.gallery.close()


def test_a_job_names_only_a_ray_cluster_the_server_trusts() -> None:
    opts = RayOptions(address="ray://head:10001", allowed_addresses=("ray://other:10001",))
    opts.check_address(None)  # the server's own
    opts.check_address("ray://head:10001")
    opts.check_address("ray://other:10001")
    with pytest.raises(RayAddressRefused, match="GRACEFUL_RAY_ALLOWED_ADDRESSES") as e:
        opts.check_address("ray://attacker:10001")
    assert status_of(e.value) == 422
    with pytest.raises(RayAddressRefused):
        RayOptions().check_address("auto")


@pytest.mark.slow
def test_the_api_takes_the_engine_and_the_report_n_workers(
    ray_cluster, make_server, tiny_test, split
) -> None:
    from service.console.backfill import describe
    from tests.support import backfill_api as api
    from tests.support.payloads import H

    _, g_idx = split
    server = make_server(GRACEFUL_RAY_WORKERS="1").start()
    c = server.client
    api.ingest(c, tiny_test, g_idx)
    for bad in (
        {"candidate": CANDIDATE, "engine": "spark"},
        {"candidate": CANDIDATE, "engine": "ray", "workers": 0},
        {"candidate": CANDIDATE, "engine": "ray", "address": ""},
    ):
        assert c.post("/v1/backfill", json=bad, headers=H).status_code == 422, bad
    # a cluster the server was not told to trust: refused before anything connects to it
    r = c.post(
        "/v1/backfill",
        json={"candidate": CANDIDATE, "engine": "ray", "address": "ray://elsewhere:10001"},
        headers=H,
    )
    assert r.status_code == 422 and "GRACEFUL_RAY_ALLOWED_ADDRESSES" in r.json()["detail"]
    r = c.get("/v1/backfill/report", params={"candidate": CANDIDATE, "workers": 0})
    assert r.status_code == 422
    one = c.get("/v1/backfill/report", params={"candidate": CANDIDATE}).json()
    two = c.get("/v1/backfill/report", params={"candidate": CANDIDATE, "workers": 2}).json()
    assert two["predicted"]["wall_seconds"] == pytest.approx(one["predicted"]["wall_seconds"] / 2, abs=0.01)
    assert "not measured with N workers" in two["throughput"]["note"]

    job = api.start(c, candidate=CANDIDATE, engine="ray", workers=2, batch_size=16)
    assert job["engine"] == "ray" and job["workers"] == 2
    job = api.wait(c, job["id"], lambda j: j["status"] == "done", timeout=180)
    assert (job["done"], job["total"], job["skipped"]) == (len(g_idx), len(g_idx), 0)
    assert "ray x2" in describe(job)
    local = api.start(c, candidate="v2", batch_size=16)
    assert local["engine"] == "local" and local["workers"] is None
    api.wait(c, local["id"], lambda j: j["status"] == "done")
    assert server.stop() == 0


@pytest.mark.slow
def test_ray_jobs_stop_pause_resume_cancel_and_keep_the_rate_cap(
    ray_cluster, tiny_models, tiny_test, tmp_path
) -> None:
    parts, eids = _parts(tiny_models, tiny_test, tmp_path)
    n = len(eids)
    runner = parts.runner(ray=RayOptions(workers=2))
    runner.start()
    try:
        before = vec_id_counter(parts.gallery)
        job = runner.create(CANDIDATE, engine="ray", batch_size=8, stop_at=0.5)
        job = wait_status(runner, job.id, ("paused",))
        assert job["done"] == n // 2  # its stop point, exactly: the chunk never goes past it

        runner.resume(job["id"], rate_limit=40)
        t0, done0 = time.monotonic(), job["done"]
        deadline = t0 + 120
        while runner.describe(job["id"])["done"] < done0 + 24:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        first = None
        while (now := runner.describe(job["id"]))["done"] < done0 + 48:  # timed after the pool is up
            first = first or (time.monotonic(), now["done"])
            assert time.monotonic() < deadline
            time.sleep(0.02)
        rate = (now["done"] - first[1]) / (time.monotonic() - first[0])
        assert rate < 40 * 1.5, f"{rate:.0f} items/s under a cap of 40"
        runner.pause(job["id"])
        time.sleep(0.5)  # a batch in flight when the pause came may still commit
        paused_at = runner.describe(job["id"])["done"]
        time.sleep(1.0)
        job = runner.describe(job["id"])
        assert job["status"] == "paused" and job["done"] == paused_at < n
        gone = time.monotonic() + 30
        while _actor_pids("EmbedActor"):  # it stopped consuming the dataset: the pool goes away
            assert time.monotonic() < gone, "the actors outlived the paused job's dataset"
            time.sleep(0.2)

        runner.resume(job["id"])
        wait = time.monotonic() + 120
        while runner.describe(job["id"])["done"] < paused_at + 8:
            assert time.monotonic() < wait
            time.sleep(0.02)
        runner.cancel(job["id"])
        time.sleep(0.5)
        cancelled_at = runner.describe(job["id"])["done"]
        time.sleep(1.0)
        job = runner.describe(job["id"])
        assert job["status"] == "cancelled" and job["done"] == cancelled_at

        last = runner.create(CANDIDATE, engine="ray", batch_size=32)
        last_state = wait_status(runner, last.id, ("done",))
        assert last_state["done"] == n and last_state["reembedded"] == n - cancelled_at  # nothing twice
        assert vec_id_counter(parts.gallery) - before == n
    finally:
        runner.stop()
        parts.gallery.close()
