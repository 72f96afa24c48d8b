"""The backfill-cost report (service/backfill/cost.py) built from the parts in-process: its curve simulated on the
gallery's labelled items or taken from the card, its times from the measured throughput or a rate cap."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_report_curve_simulated_or_from_the_card(tiny_models, tiny_test, split, tmp_path) -> None:
    """The cost report in-process: a simulated curve when labelled sources are kept, the card's line when
    not, times from the measured throughput (or a cap), and the items that cannot be backfilled."""
    import shutil

    from index import Gallery, NewItem
    from service.backfill.cost import CostReport, ThroughputProbe
    from service.backfill.curve import CurveCache
    from service.blobs import BlobStore
    from service.images import encode_png
    from service.models.cache import ModelCache
    from service.models.hot_swap import HotSwap
    from service.models.registry import ModelRegistry

    _, g_idx = split
    shutil.copytree(tiny_models, tmp_path / "models")
    blobs = BlobStore(tmp_path / "blobs")
    with Gallery.open(None, tmp_path / "data") as gallery:
        registry = ModelRegistry(tmp_path / "models", gallery)
        registry.scan()
        models = ModelCache(registry)
        swap = HotSwap(registry, models)
        swap.activate("v1")
        v1 = swap.active
        vecs = v1.embed(tiny_test.images[g_idx])
        items = [
            NewItem(
                f"g{i}",
                v,
                metadata={"label": int(tiny_test.labels[i])},
                source_uri=None if n < 3 else blobs.put(encode_png(tiny_test.images[i])),
            )
            for n, (i, v) in enumerate(zip(g_idx, vecs, strict=True))
        ]
        gallery.add(items, "v1")
        swap.activate("v2")
        probe = ThroughputProbe(32, 1)

        def backfill_report(candidate, price, *, blobs, curves, sample_size, rate_limit=None):
            return CostReport(
                swap,
                models,
                probe,
                blobs=blobs,
                curves=curves,
                price_per_cpu_hour=price,
                sample_size=sample_size,
            ).report(candidate, rate_limit)

        rep = backfill_report("v2", 0.05, blobs=blobs, curves=CurveCache(), sample_size=500)
        curve = rep["curve"]
        assert curve["method"] == "simulated" and curve["sample"]["simulated"] == len(g_idx) - 3
        assert set(curve["policies"]) == {"sequential", "uncertainty"}
        assert rep["cannot_backfill"]["count"] == 3
        assert {e["external_id"] for e in rep["cannot_backfill"]["examples"]} == {f"g{i}" for i in g_idx[:3]}
        ips = rep["throughput"]["images_per_second"]
        last = curve["policies"]["sequential"][-1]
        assert (
            last["items"] == len(g_idx)
            and abs(last["seconds"] - len(g_idx) / ips) < 0.05 + 0.01 * last["seconds"]
        )

        capped = backfill_report(
            "v2", 0.05, blobs=blobs, curves=CurveCache(), sample_size=500, rate_limit=10.0
        )
        assert capped["curve"]["policies"]["uncertainty"][-1]["seconds"] == pytest.approx(
            len(g_idx) / 10.0, abs=0.01
        )
        assert capped["predicted"]["wall_seconds"] == pytest.approx(len(g_idx) / 10.0, abs=0.01)

        card = backfill_report("v2", 0.05, blobs=blobs, curves=None, sample_size=0)["curve"]
        matrix = registry.entry("v2").card.metrics["matrix"]
        assert card["method"] == "card"
        for policy in ("sequential", "uncertainty"):
            pts = card["policies"][policy]
            assert pts[0]["quality"]["mAP"] == pytest.approx(matrix["v2/v1"]["mAP"], abs=1e-4)
            assert pts[-1]["quality"]["mAP"] == pytest.approx(matrix["v2/v2"]["mAP"], abs=1e-4)
