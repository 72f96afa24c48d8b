"""The compatibility matrix: every (query model, gallery model) pair on the retrieval protocol.

Each model embeds the test split once; the query set (index % 5 == 0) embedded by the query model searches
the gallery (the rest) embedded by the gallery model. Cells exist where the embedding sizes match. Metrics
are given overall and split by the query's class: old classes (those of the first model), new ones (known to
a later model only) and unseen ones (known to no model).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from trainer.artifact import LoadedModel, embed_images, predict_labels
from trainer.data import Dataset, Split, iter_views, query_gallery_split
from trainer.metrics import negative_flips, retrieval_flips, retrieval_metrics, top1_hits, update_gain

METRICS = ("top1", "top5", "mAP")


@dataclass
class CompatReport:
    """Result of ``evaluate_models``; ``to_json()`` is the CLI's JSON (a contract: docs/architecture.md)."""

    models: list[str]
    old_classes: list[int]
    matrix: dict[str, dict[str, Any]] = field(default_factory=dict)
    flips: dict[str, dict[str, Any]] = field(default_factory=dict)
    # "<old>-><new>": {"new/old": ..., "new/new": ...}: retrieval flips of each setting against old/old
    # (trainer.metrics.retrieval_flips; the flipped queries by test-split index)
    retrieval_flips: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    bct: dict[str, dict[str, Any]] = field(default_factory=dict)
    spaces: dict[str, str] = field(default_factory=dict)

    def cell(self, query: str, gallery: str) -> dict[str, Any] | None:
        return self.matrix.get(f"{query}/{gallery}")

    def to_json(self, include_flipped: bool = True) -> dict[str, Any]:
        d = asdict(self)
        if not include_flipped:
            entries = [*d["flips"].values(), *(e for p in d["retrieval_flips"].values() for e in p.values())]
            for f in entries:
                for k in [k for k in f if k.startswith("flipped")]:
                    f.pop(k)
        return d

    def card_metrics(self, version: str) -> dict[str, Any]:
        """What a model's card keeps: the matrix with its parent, BCT, and classification and retrieval flips
        against it (no example lists)."""
        return {
            "protocol": "test split, queries = index % 5 == 0, gallery = the rest",
            "matrix": self.matrix,
            "bct": {k: v for k, v in self.bct.items() if k.startswith(f"{version}/")},
            "flips": {
                k: {kk: vv for kk, vv in v.items() if not kk.startswith("flipped")}
                for k, v in self.flips.items()
                if k.endswith(f"->{version}")
            },
            "retrieval_flips": {
                k: {s: _no_lists(e) for s, e in v.items()}
                for k, v in self.retrieval_flips.items()
                if k.endswith(f"->{version}")
            },
        }


def _no_lists(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if not k.startswith("flipped")}


def _split_metrics(q, ql, g, gl, old_classes: list[int], known: list[int]) -> dict[str, Any]:
    """Metrics of (Q, D) queries with labels (Q,) against a (G, D) gallery, overall and split three ways by
    the query's class: ``old_classes`` (the first model's), ``new_classes`` (known to a later model only) and
    ``unseen_classes`` (known to no model: the items every real gallery holds). Empty parts are left out."""
    cell: dict[str, Any] = retrieval_metrics(q, ql, g, gl)
    is_old = np.isin(ql, old_classes)
    is_known = np.isin(ql, known)
    parts = (("old_classes", is_old), ("new_classes", is_known & ~is_old), ("unseen_classes", ~is_known))
    for name, mask in parts:
        if mask.any():
            cell[name] = retrieval_metrics(q[mask], ql[mask], g, gl)
    return cell


def embed_models(
    models: list[LoadedModel], ds: Split, batch_size: int = 256, workers: int | None = None
) -> dict[str, np.ndarray]:
    """Each model's (N, D) embeddings of ``ds``, every model through its own input contract.

    In-memory data of a model's own shape is embedded as one array, as always; anything else is streamed
    once for all the other models (a folder's images are decoded once each, by loader workers), so what is
    held is the embeddings (N x D floats per model), never the decoded split."""
    out: dict[str, np.ndarray] = {}
    streamed = []
    for m in models:
        if isinstance(ds, Dataset) and m.preprocess.shape == ds.images.shape[1:]:
            out[m.version] = embed_images(m, ds.images)
        else:
            streamed.append(m)
    parts: dict[str, list[np.ndarray]] = {m.version: [] for m in streamed}
    if streamed:
        for views, _ in iter_views(ds, [m.preprocess for m in streamed], batch_size, None, workers):
            for m, v in zip(streamed, views, strict=True):
                parts[m.version].append(embed_images(m, v.numpy()))
    for m in streamed:
        out[m.version] = np.concatenate(parts[m.version]) if parts[m.version] else embed_images(m, [])
    return out


def evaluate_models(
    models: list[LoadedModel],
    test: Split,
    old_classes: list[int] | None = None,
    every: int = 5,
    workers: int | None = None,
) -> CompatReport:
    """Compatibility matrix, BCT criterion / update gain, negative flips (classification) and retrieval
    flips (new/old and new/new against old/old) for ``models`` (oldest first)."""
    if not models:
        raise ValueError("evaluate_models needs at least one model")
    names = [m.version for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model versions must be distinct, got {names}")
    old_classes = list(old_classes if old_classes is not None else models[0].card.classes)
    q_idx, g_idx = query_gallery_split(len(test), every)
    labels = test.labels
    embs = embed_models(models, test, workers=workers)
    known = sorted({c for m in models for c in m.card.classes} | set(old_classes))
    report = CompatReport(
        models=names, old_classes=old_classes, spaces={m.version: m.card.space for m in models}
    )

    for qm in models:
        for gm in models:
            if qm.card.embedding_dim != gm.card.embedding_dim:
                continue
            report.matrix[f"{qm.version}/{gm.version}"] = _split_metrics(
                embs[qm.version][q_idx],
                labels[q_idx],
                embs[gm.version][g_idx],
                labels[g_idx],
                old_classes,
                known,
            )

    hits: dict[tuple[str, str], np.ndarray] = {}

    def top1(query: str, gallery: str) -> np.ndarray:  # (Q,) bool, per cell, computed once
        if (query, gallery) not in hits:
            hits[query, gallery] = top1_hits(
                embs[query][q_idx], labels[q_idx], embs[gallery][g_idx], labels[g_idx]
            )
        return hits[query, gallery]

    preds = {m.version: predict_labels(m, embs[m.version]) for m in models}
    for i, old in enumerate(models):
        for new in models[i + 1 :]:
            report.flips[f"{old.version}->{new.version}"] = negative_flips(
                preds[old.version], preds[new.version], labels
            )
            o, n = old.version, new.version
            settings = {"new/old": (n, o), "new/new": (n, n)}
            report.retrieval_flips[f"{o}->{n}"] = {
                name: {
                    "old_setting": f"{o}/{o}",
                    "new_setting": f"{q}/{g}",
                    **retrieval_flips(top1(o, o), top1(q, g), q_idx),
                }
                for name, (q, g) in settings.items()
                if report.cell(q, g) is not None and report.cell(o, o) is not None
            }
            oo, no, nn = (
                report.cell(a, b)
                for a, b in (
                    (old.version, old.version),
                    (new.version, old.version),
                    (new.version, new.version),
                )
            )
            if oo is None or no is None:
                continue
            entry: dict[str, Any] = {
                "passes": {m: bool(no[m] > oo[m]) for m in METRICS},
                "delta": {m: no[m] - oo[m] for m in METRICS},
            }
            if nn is not None:
                entry["update_gain"] = {m: _finite(update_gain(no[m], oo[m], nn[m])) for m in METRICS}
            report.bct[f"{new.version}/{old.version}"] = entry
    return report


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x


def format_matrix(report: CompatReport, metric: str = "mAP") -> str:
    """The matrix as a text table (rows: query model, columns: gallery model) for people."""
    w = max(8, *(len(n) for n in report.models)) + 2
    lines = [f"{metric} (query \\ gallery)".ljust(w + 8) + "".join(n.rjust(w) for n in report.models)]
    for q in report.models:
        row = q.ljust(w + 8)
        for g in report.models:
            c = report.cell(q, g)
            row += (f"{c[metric]:.4f}" if c else "-").rjust(w)
        lines.append(row)
    return "\n".join(lines)


def format_flips(flips: dict[str, Any], class_names: list[str] | None = None, limit: int = 20) -> str:
    """The first ``limit`` negative flips of one pair as text lines: test index, true label (= the old model's
    prediction), the new model's prediction."""
    idx, true, new = (
        flips.get("flipped", []),
        flips.get("flipped_label", []),
        flips.get("flipped_new_pred", []),
    )

    def name(c: int) -> str:
        known = class_names and 0 <= c < len(class_names) and class_names[c] != str(c)
        return f"{c} ({class_names[c]})" if known else str(c)  # type: ignore[index]

    shown = list(zip(idx, true, new, strict=False))[: max(0, limit)]
    lines = [f"  test #{i:<6} true {name(t):<18} old {name(t):<18} new {name(n)}" for i, t, n in shown]
    if len(idx) > len(shown):
        lines.append(f"  ... and {len(idx) - len(shown)} more (all in the JSON report)")
    return "\n".join(lines) if lines else "  no negative flips"
