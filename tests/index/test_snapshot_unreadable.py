"""A snapshot file that cannot be read, whatever its parser raises, never stops the gallery from opening."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from index import Gallery, VersionInfo
from index import snapshot as snap
from tests.index._gallery_data import items, random_vectors

X = random_vectors(80, 16, seed=51)


def _snapshotted(database_url: str, data_dir: Path) -> None:
    with Gallery.open(database_url, data_dir, snapshot_every=None) as g:
        g.register_version(VersionInfo("v1", space="v1", embedding_dim=16))
        g.add(items(X), "v1")


def _assert_opens_and_finds_everything(database_url: str, data_dir: Path) -> None:
    with Gallery.open(database_url, data_dir) as g:
        assert g.consistency("v1") == (80, 80)
        assert [row[0].external_id for row in g.search("v1", X, 1)] == [f"item{i}" for i in range(80)]


def test_truncated_lookup_does_not_stop_the_open(
    database_url: str, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A truncated ``.entries.npz`` made ``np.load`` raise ``zipfile.BadZipFile`` out of ``Gallery.open``."""
    _snapshotted(database_url, data_dir)
    lookup = snap.paths(data_dir / "index", "v1")[1]
    lookup.write_bytes(lookup.read_bytes()[:-100])
    with caplog.at_level(logging.WARNING, logger="index"):
        _assert_opens_and_finds_everything(database_url, data_dir)
    assert any(r.levelno == logging.WARNING and "lookup" in r.getMessage() for r in caplog.records)


class _Odd(Exception):
    """An exception no reader expects."""


@pytest.mark.parametrize("where", ["faiss", "lookup", "sidecar"])
def test_any_exception_reading_a_snapshot_means_rebuilding(
    database_url: str,
    data_dir: Path,
    where: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _snapshotted(database_url, data_dir)

    def boom(*args: object, **kwargs: object) -> None:
        raise _Odd("unexpected")

    target = {"faiss": (snap.faiss, "read_index"), "lookup": (np, "load"), "sidecar": (snap, "SnapshotInfo")}[
        where
    ]
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="index"):
        m.setattr(*target, boom)
        g = Gallery.open(database_url, data_dir)  # only the open reads snapshots
    with g:
        assert g.consistency("v1") == (80, 80)
        assert [row[0].external_id for row in g.search("v1", X, 1)] == [f"item{i}" for i in range(80)]
    assert any(r.levelno == logging.WARNING and "_Odd" in r.getMessage() for r in caplog.records)
