"""The backfill-cost report for N workers: the measured single-worker rate x N, and it says it is predicted."""

from __future__ import annotations

import numpy as np
import pytest

from service.backfill.cost import WORKERS_NOTE, CostReport, ThroughputProbe
from tests.service.backfill.runner_parts import ingest, open_parts


@pytest.mark.slow
def test_two_workers_halve_the_predicted_time(tiny_models, tiny_test, tmp_path) -> None:
    parts = open_parts(tiny_models, tmp_path)
    try:
        ingest(parts, tiny_test, np.arange(60))
        costs = CostReport(
            parts.swap,
            parts.models,
            ThroughputProbe(32, 1),  # measured once, cached: both reports use the same rate
            blobs=parts.blobs,
            curves=None,
            price_per_cpu_hour=0.05,
            sample_size=0,
        )
        one, two = costs.report("v2"), costs.report("v2", workers=2)
        rate = one["throughput"]["images_per_second"]
        assert two["throughput"]["per_worker_images_per_second"] == pytest.approx(rate, abs=0.1)
        assert (one["throughput"]["workers"], two["throughput"]["workers"]) == (1, 2)
        assert two["predicted"]["workers"] == 2 and two["throughput"]["note"] == WORKERS_NOTE
        assert two["throughput"]["predicted_images_per_second"] == pytest.approx(2 * rate, abs=0.2)
        assert two["predicted"]["wall_seconds"] == pytest.approx(
            one["predicted"]["wall_seconds"] / 2, abs=0.01
        )
        # the same CPU time, spread over twice the workers
        assert two["predicted"]["cpu_hours"] == pytest.approx(one["predicted"]["cpu_hours"], rel=0.01)
        last = [c["policies"]["sequential"][-1]["seconds"] for c in (one["curve"], two["curve"])]
        assert last[1] == pytest.approx(last[0] / 2, abs=0.01)
        # a rate cap still caps the total
        capped = costs.report("v2", rate_limit=1.0, workers=4)
        assert capped["predicted"]["wall_seconds"] == pytest.approx(60.0, abs=0.01)
    finally:
        parts.gallery.close()
