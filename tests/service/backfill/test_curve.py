"""The report's mixed-gallery model: its end points equal plain retrieval metrics, and orders matter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.backfill.curve import Sample, card_line, label_of, mixed_gallery_quality, simulate
from service.backfill.order import margin_scores, order_by_scores
from trainer.metrics import retrieval_metrics


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _data(seed: int = 0, n: int = 120, d: int = 16, classes: int = 4):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, d))
    new = _unit(centres[labels] + 0.5 * rng.normal(size=(n, d)))  # tight classes
    old = _unit(centres[labels] + 1.5 * rng.normal(size=(n, d)))  # loose classes
    return labels, old, new


def test_end_points_equal_plain_retrieval_metrics() -> None:
    labels, old, new = _data()
    queries = _unit(np.random.default_rng(9).normal(size=(30, 16)) + new[:30])
    qlab = labels[:30]
    got = mixed_gallery_quality(queries, qlab, old, new, labels, np.arange(len(old)), [0.0, 1.0], chunk=7)
    for res, gallery in ((got[0], old), (got[1], new)):
        ref = retrieval_metrics(queries, qlab, gallery, labels)
        for k in ("top1", "top5", "mAP"):
            assert abs(res[k] - ref[k]) < 1e-9, (k, res[k], ref[k])


def test_leave_one_out_excludes_the_query_itself() -> None:
    labels, old, new = _data(seed=1, n=40)
    got = mixed_gallery_quality(new, labels, old, new, labels, np.arange(40), [1.0], leave_one_out=True)[0]
    sums = {"top1": 0.0, "mAP": 0.0}
    for i in range(40):
        keep = np.arange(40) != i
        ref = retrieval_metrics(new[i : i + 1], labels[i : i + 1], new[keep], labels[keep])
        sums["top1"] += ref["top1"] / 40
        sums["mAP"] += ref["mAP"] / 40
    assert abs(got["top1"] - sums["top1"]) < 1e-9 and abs(got["mAP"] - sums["mAP"]) < 1e-9


def test_fraction_follows_the_order() -> None:
    labels, old, new = _data(seed=2, n=60)
    order = np.random.default_rng(3).permutation(60)
    half = mixed_gallery_quality(new, labels, old, new, labels, order, [0.5])[0]
    mixed = old.copy()
    mixed[order[:30]] = new[order[:30]]
    ref = retrieval_metrics(new, labels, mixed, labels)
    assert abs(half["mAP"] - ref["mAP"]) < 1e-9


def test_simulate_other_space_keeps_current_quality_until_complete() -> None:
    labels, old, new = _data(seed=4, n=50)
    sample = Sample(
        item_ids=np.arange(50),
        labels=labels,
        old=old,
        new=new,
        orders={"sequential": np.arange(50), "uncertainty": np.arange(50)[::-1]},
    )
    curves = simulate(sample, same_space=False, fractions=[0.0, 0.5, 1.0])
    for curve in curves.values():
        assert curve[0] == curve[1] and curve[2]["mAP"] > curve[0]["mAP"]
    same = simulate(sample, same_space=True, fractions=[0.0, 1.0])
    assert same["sequential"][1] == same["uncertainty"][1]  # all re-embedded: the order no longer matters


def test_card_line_and_labels() -> None:
    line = card_line({"mAP": 0.5}, {"mAP": 0.7}, True, {"mAP": 0.4}, fractions=[0, 0.5, 1])
    assert [round(p["mAP"], 6) for p in line] == [0.5, 0.6, 0.7]
    line = card_line(None, {"mAP": 0.7}, False, {"mAP": 0.4}, fractions=[0, 0.5, 1])
    assert [p["mAP"] for p in line] == [0.4, 0.4, 0.7]
    assert card_line(None, {"mAP": 0.7}, True, None) is None
    assert [
        label_of(m) for m in ({"label": 3}, {"label": "7"}, {"label": True}, {"x": 1}, None, {"label": "a"})
    ] == [3, 7, None, None, None, None]


@pytest.mark.slow  # needs the tiny trained models
def test_margin_scores_rank_ambiguous_embeddings_first(tiny_models) -> None:
    from trainer.artifact import load_model

    v1 = load_model(tiny_models / "v1")
    w = torch.nn.functional.normalize(v1.model.head.weight.detach(), dim=1).numpy()
    sure = w[0]  # exactly on a class centre
    between = _unit((w[0] + w[1])[None])[0]  # halfway between two centres
    scores = margin_scores(v1, np.stack([sure, between]).astype(np.float32))
    assert scores[1] < scores[0] and scores.min() >= 0 and scores.max() <= 1
    order = order_by_scores(np.array([10, 11, 12]), np.array([0.5, np.nan, 0.1]))
    assert order.tolist() == [2, 0, 1]
