"""Damaged snapshots: whatever happened to a snapshot file, the gallery opens, rebuilds from SQL (logged) and
answers exactly like brute force over the stored vectors.

Each snapshot file (the FAISS index, the id lookup, the JSON sidecar) is damaged in turn: truncated, one
byte flipped, a range in the middle overwritten with random bytes, and (still valid files) a lookup with
its ids permuted or an index with the same ids but other vectors. A snapshot rewritten *consistently*
(checksums matching) but with wrong content is caught by the sampled comparison with SQL.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import pytest

from index import Gallery, VersionInfo
from index import snapshot as snap
from index.space_index import make_faiss_index
from tests.index._gallery_data import brute_topk, items, random_vectors

N, D = 300, 16
X = random_vectors(N, D, seed=41)
FACTORIES = {"Flat": None, "HNSW16": None, "IVF4,Flat": 100}  # factory -> min_train


def _open(database_url: str, data_dir: Path, factory: str) -> Gallery:
    return Gallery.open(
        database_url, data_dir, index_factory=factory, snapshot_every=None, min_train=FACTORIES[factory]
    )


def _snapshotted(database_url: str, data_dir: Path, factory: str) -> None:
    """A closed gallery of N seeded items whose snapshot (written at close) covers all of them."""
    g = _open(database_url, data_dir, factory)
    g.register_version(VersionInfo("v1", space="v1", embedding_dim=D))
    g.add(items(X), "v1")
    assert g.index_info("v1")["built_factory"] == factory
    g.close()
    for p in snap.paths(data_dir / "index", "v1"):
        assert p.exists(), p


def _assert_rebuilt_and_exact(database_url: str, data_dir: Path, factory: str) -> None:
    """Reopen: the snapshot is not used, every item is its own stored vector's top-1 like brute force."""
    with _open(database_url, data_dir, factory) as g:
        (report,) = g.last_open_reports
        assert not report.snapshot_used and report.total == N
        assert g.consistency("v1") == (N, N)
        scores, idx = brute_topk(X, X, 1)
        hits = g.search("v1", X, 1)
        assert [row[0].external_id for row in hits] == [f"item{i}" for i in idx[:, 0]]
        assert [row[0].external_id for row in hits] == [f"item{i}" for i in range(N)]
        np.testing.assert_allclose([row[0].score for row in hits], scores[:, 0], atol=1e-5)


# ---------------------------------------------------------------- byte-level damage
def _truncate(p: Path, rng: np.random.Generator, factory: str) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip(p: Path, rng: np.random.Generator, factory: str) -> None:
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x01  # one bit of one byte: the smallest damage there is
    p.write_bytes(bytes(b))


def _overwrite_middle(p: Path, rng: np.random.Generator, factory: str) -> None:
    b = bytearray(p.read_bytes())
    n = min(256, len(b) // 4)
    start = len(b) // 2 - n // 2
    b[start : start + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    p.write_bytes(bytes(b))


def _permute_lookup(p: Path, rng: np.random.Generator, factory: str) -> None:
    """Still a valid lookup file of the same format: only which vec_id maps to which item changes."""
    with np.load(p, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    perm = rng.permutation(len(arrays["vec_ids"]))
    ext = bytes(arrays["external_ids"]).decode().split("\x00")
    arrays["item_ids"] = arrays["item_ids"][perm]
    arrays["version_codes"] = arrays["version_codes"][perm]
    arrays["external_ids"] = np.frombuffer("\x00".join(ext[i] for i in perm).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    p.write_bytes(buf.getvalue())


def _same_ids_other_vectors(
    index: faiss.IndexIDMap2, factory: str, rng: np.random.Generator
) -> faiss.IndexIDMap2:
    """An index of the same factory and ids, each id holding another item's vector."""
    ids = faiss.vector_to_array(index.id_map)
    other = make_faiss_index(factory, D)
    if not other.is_trained:
        other.train(X)
    other.add_with_ids(X[rng.permutation(N)][: len(ids)], ids)
    return other


def _other_vectors(p: Path, rng: np.random.Generator, factory: str) -> None:
    """Still a valid FAISS file of the same factory and ids, but with other vectors."""
    faiss.write_index(_same_ids_other_vectors(faiss.read_index(str(p)), factory, rng), str(p))


DAMAGE: dict[str, Callable[[Path, np.random.Generator, str], None]] = {
    "truncate": _truncate,
    "flip": _flip,
    "overwrite": _overwrite_middle,
}
CASES = (
    [(0, kind) for kind in [*DAMAGE, "other vectors"]]  # the .faiss
    + [(1, kind) for kind in [*DAMAGE, "permute"]]  # the .entries.npz
    + [(2, kind) for kind in DAMAGE]  # the .json sidecar
)
EXTRA = {"other vectors": _other_vectors, "permute": _permute_lookup}


@pytest.mark.parametrize("factory", list(FACTORIES))
@pytest.mark.parametrize(
    ("which", "kind"), CASES, ids=[f"{['faiss', 'lookup', 'sidecar'][w]}-{k}" for w, k in CASES]
)
def test_damaged_snapshot_file_is_rebuilt_from_sql(
    database_url: str, data_dir: Path, factory: str, which: int, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    _snapshotted(database_url, data_dir, factory)
    path = snap.paths(data_dir / "index", "v1")[which]
    (DAMAGE | EXTRA)[kind](path, np.random.default_rng(7), factory)
    with caplog.at_level(logging.WARNING, logger="index"):
        _assert_rebuilt_and_exact(database_url, data_dir, factory)
    assert any(r.levelno == logging.WARNING and "v1" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- consistent but wrong snapshots
def _rewrite(data_dir: Path, factory: str, change: str) -> None:
    """Rewrite the snapshot through :func:`index.snapshot.write` (checksums matching its new content)
    with wrong content: only the sampled comparison with SQL can tell."""
    index_dir = data_dir / "index"
    loaded = snap.read(index_dir, "v1", D, factory)
    assert loaded is not None and loaded.entries is not None
    entries, index = loaded.entries, loaded.index
    rng = np.random.default_rng(3)
    if change == "permuted lookup":
        perm = rng.permutation(len(entries.vec_ids))
        entries = snap.EntryArrays(
            entries.vec_ids,
            entries.item_ids[perm],
            [entries.external_ids[i] for i in perm],
            [entries.versions[i] for i in perm],
        )
    else:
        index = _same_ids_other_vectors(index, factory, rng)
    snap.write(index_dir, index, entries, loaded.info)


@pytest.mark.parametrize("factory", list(FACTORIES))
@pytest.mark.parametrize("change", ["permuted lookup", "other vectors"])
def test_consistent_but_wrong_snapshot_is_caught_by_the_sample(
    database_url: str, data_dir: Path, factory: str, change: str, caplog: pytest.LogCaptureFixture
) -> None:
    _snapshotted(database_url, data_dir, factory)
    _rewrite(data_dir, factory, change)
    with caplog.at_level(logging.WARNING, logger="index"):
        _assert_rebuilt_and_exact(database_url, data_dir, factory)
    assert any("SQL" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


@pytest.mark.parametrize("factory", list(FACTORIES))
def test_healthy_snapshot_is_used(database_url: str, data_dir: Path, factory: str) -> None:
    """The checks refuse no good snapshot (whatever the index type: reconstructable or not)."""
    _snapshotted(database_url, data_dir, factory)
    with _open(database_url, data_dir, factory) as g:
        (report,) = g.last_open_reports
        assert report.snapshot_used and report.replayed == 0 and report.total == N
        assert [row[0].external_id for row in g.search("v1", X, 1)] == [f"item{i}" for i in range(N)]
