"""A Ray job where nothing started Ray: the runner's thread starts a local cluster itself (``ray.init`` off the
main thread), runs the job on it, and stopping the runner shuts that cluster down."""

from __future__ import annotations

import numpy as np
import pytest

from service.backfill.ray_engine import RayOptions
from tests.service.backfill.runner_parts import ingest, open_parts, wait_status


@pytest.mark.slow
def test_the_runner_starts_and_stops_a_local_ray_cluster(tiny_models, tiny_test, tmp_path) -> None:
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")
    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process")
    parts = open_parts(tiny_models, tmp_path)
    ingest(parts, tiny_test, np.arange(48))
    runner = parts.runner(ray=RayOptions(workers=1, object_store_memory=100 * 1024 * 1024))
    runner.start()
    try:
        job = runner.create("v2-indep", engine="ray", batch_size=16)
        job = wait_status(runner, job.id, ("done",), timeout=180)
        assert job["done"] == 48 and job["engine"] == "ray" and job["workers"] == 1
        assert ray.is_initialized()
    finally:
        runner.stop()
        parts.gallery.close()
    assert not ray.is_initialized()
