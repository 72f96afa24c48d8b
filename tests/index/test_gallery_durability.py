"""Durability: close/reopen gives the same answers; snapshots are reconciled with SQL; a SIGKILLed
writer loses nothing it acknowledged."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

from index import Gallery, VersionInfo
from tests.index._gallery_data import answers, items, random_vectors

REPO = Path(__file__).resolve().parents[2]
Q = random_vectors(12, 16, seed=21)


def crash(g: Gallery) -> None:
    """Abandon a gallery without snapshotting, as a killed process would."""
    g._closed = True
    g.engine.dispose()


def _setup(database_url: str, data_dir: Path, factory: str) -> Gallery:
    g = Gallery.open(database_url, data_dir, index_factory=factory, snapshot_every=None)
    g.register_version(VersionInfo("v1", space="v1", embedding_dim=16))
    g.register_version(VersionInfo("v2", space="v1", embedding_dim=16, compatible_with="v1"))
    return g


@pytest.mark.parametrize("factory", ["Flat", "HNSW16"])
def test_close_and_reopen_gives_same_answers(database_url: str, data_dir: Path, factory: str) -> None:
    g = _setup(database_url, data_dir, factory)
    x = random_vectors(200, 16, seed=22)
    g.add(items(x[:100]), "v1")
    g.add(items(x[100:], start=100), "v2")
    g.delete([f"item{i}" for i in range(0, 200, 20)])  # HNSW: tombstones, kept in the snapshot
    g.reembed([("item1", x[150])], "v2")
    before = answers(g, "v1", Q, 10)
    g.close()
    with Gallery.open(database_url, data_dir, index_factory=factory) as g2:
        (report,) = g2.last_open_reports
        assert report.snapshot_used and report.replayed == 0 and report.total == 190
        assert answers(g2, "v1", Q, 10) == before
        assert g2.consistency("v1") == (190, 190)
        assert g2.counts_by_version() == {"v1": 94, "v2": 96}


def test_reopen_replays_what_the_snapshot_misses(database_url: str, data_dir: Path) -> None:
    g = _setup(database_url, data_dir, "Flat")
    x = random_vectors(120, 16, seed=23)
    g.add(items(x[:100]), "v1")
    (snap,) = g.snapshot()
    assert snap.ntotal == 100 and snap.watermark > 0
    # after the snapshot: 20 adds, 5 re-embeds (superseding 5 snapshotted ids), 10 deletes
    g.add(items(x[100:], start=100), "v1")
    g.reembed([(f"item{i}", x[i] * -1) for i in range(5)], "v2")
    g.delete([f"item{i}" for i in range(10, 20)])
    before = answers(g, "v1", Q, 10)
    crash(g)
    with Gallery.open(database_url, data_dir) as g2:
        (report,) = g2.last_open_reports
        assert report.snapshot_used
        assert (report.replayed, report.dropped, report.total) == (25, 15, 110)
        assert answers(g2, "v1", Q, 10) == before
        assert g2.consistency("v1") == (110, 110)


def test_reopen_without_snapshot_rebuilds_from_sql(database_url: str, data_dir: Path) -> None:
    g = _setup(database_url, data_dir, "Flat")
    g.add(items(random_vectors(50, 16, seed=24)), "v1")
    before = answers(g, "v1", Q, 5)
    crash(g)
    with Gallery.open(database_url, data_dir) as g2:
        (report,) = g2.last_open_reports
        assert not report.snapshot_used and report.replayed == 50
        assert answers(g2, "v1", Q, 5) == before


@pytest.mark.parametrize(
    "damage",
    [
        "garbage index",
        "garbage sidecar",
        "missing index",
        "other factory",
        "torn",
        "garbage lookup",
        "missing lookup",
        "old lookup",
    ],
)
def test_damaged_or_mismatched_snapshot_is_rebuilt(database_url: str, data_dir: Path, damage: str) -> None:
    g = _setup(database_url, data_dir, "Flat")
    x = random_vectors(60, 16, seed=25)
    g.add(items(x[:40]), "v1")
    g.snapshot()
    lookup_path = data_dir / "index" / "v1.entries.npz"
    old_lookup = lookup_path.read_bytes()
    g.add(items(x[40:], start=40), "v1")
    g.delete(["item0"])
    before = answers(g, "v1", Q, 8)
    g.close()
    faiss_path, meta_path = data_dir / "index" / "v1.faiss", data_dir / "index" / "v1.json"
    factory = "Flat"
    if damage == "garbage index":
        faiss_path.write_bytes(b"not a faiss index")
    elif damage == "garbage sidecar":
        meta_path.write_text("{")
    elif damage == "missing index":
        faiss_path.unlink()
    elif damage == "other factory":
        factory = "HNSW16"
    elif damage == "torn":  # new index file, stale sidecar (crash between the replaces)
        meta_path.write_text(meta_path.read_text().replace('"ntotal": 59', '"ntotal": 40'))
    elif damage == "garbage lookup":
        lookup_path.write_bytes(b"PK garbage")
    elif damage == "missing lookup":
        lookup_path.unlink()
    elif damage == "old lookup":  # lookup of an older generation than the index
        lookup_path.write_bytes(old_lookup)
    with Gallery.open(database_url, data_dir, index_factory=factory) as g2:
        assert answers(g2, "v1", Q, 8) == before
        assert g2.consistency("v1") == (59, 59)


def test_writes_by_another_process_below_the_watermark(database_url: str, tmp_path: Path) -> None:
    """A second writer's rows interleave with ours (ids below our snapshot's watermark): reopening and
    ``reconcile()`` still end with index == DB."""
    g1 = _setup(database_url, tmp_path / "one", "Flat")
    g2 = Gallery.open(database_url, tmp_path / "two")
    x = random_vectors(30, 16, seed=28)
    g1.add(items(x[:10]), "v1")
    g2.add(items(x[10:20], start=10), "v1")  # g1 does not see these
    g1.add(items(x[20:], start=20), "v1")
    g2.delete(["item21"])  # nor this
    assert g1.consistency("v1") == (20, 29)
    g1.snapshot()
    crash(g1)
    g2.close()
    with Gallery.open(database_url, tmp_path / "one") as g:
        (report,) = g.last_open_reports
        assert report.snapshot_used and (report.replayed, report.dropped, report.total) == (10, 1, 29)
        assert g.consistency("v1") == (29, 29)
        assert g.search("v1", x[15], 1)[0][0].external_id == "item15"
        g3 = Gallery.open(database_url, tmp_path / "three")
        g3.add(items(x[:1], prefix="other"), "v1")
        g3.close()
        assert g.consistency("v1") == (29, 30)
        g.reconcile()
        assert g.consistency("v1") == (30, 30)
        assert g.search("v1", x[0], 2)[0][1].external_id in ("item0", "other0")


def test_snapshot_every_and_temp_files(database_url: str, data_dir: Path) -> None:
    g = Gallery.open(database_url, data_dir, snapshot_every=30)
    g.register_version(VersionInfo("v1", space="v1", embedding_dim=16))
    g.add(items(random_vectors(20, 16, seed=26)), "v1")
    assert not (data_dir / "index" / "v1.faiss").exists()
    g.add(items(random_vectors(20, 16, seed=27), start=20), "v1")
    assert (data_dir / "index" / "v1.faiss").exists()
    crash(g)
    stale = data_dir / "index" / ".v1.faiss.999999999.tmp"  # left by a dead writer
    stale.write_bytes(b"x")
    with Gallery.open(database_url, data_dir) as g2:
        assert not stale.exists()
        assert g2.last_open_reports[0].replayed == 0 and g2.consistency("v1") == (40, 40)


CHILD = textwrap.dedent(
    """
    import sys
    import zlib
    from pathlib import Path

    import numpy as np

    from index import Gallery, NewItem, VersionInfo

    url, data, prefix = sys.argv[1], Path(sys.argv[2]), sys.argv[3]

    def vec(name):
        return np.random.RandomState(zlib.crc32(name.encode())).randn(16).astype("float32")

    g = Gallery.open(url, data, snapshot_every=120)  # snapshots get written (and killed) mid-run
    g.register_version(VersionInfo("v1", space="v1", embedding_dim=16))
    g.register_version(VersionInfo("v2", space="v1", embedding_dim=16, compatible_with="v1"))
    for b in range(2000):  # bounded: the parent kills us long before
        batch = [NewItem(f"{prefix}{b}-{j}", vec(f"{prefix}{b}-{j}")) for j in range(8)]
        g.add(batch, "v1")
        print("A " + " ".join(it.external_id for it in batch), flush=True)
        if b % 4 == 3:
            g.delete([f"{prefix}{b - 1}-0"])
            print(f"D {prefix}{b - 1}-0", flush=True)
            g.reembed([(f"{prefix}{b - 2}-1", vec(f"{prefix}{b - 2}-1x"))], "v2")
            print(f"R {prefix}{b - 2}-1", flush=True)
    """
)


def _vec(name: str) -> np.ndarray:
    """The child's vector for ``name``."""
    return np.random.RandomState(zlib.crc32(name.encode())).randn(16).astype("float32")


@pytest.mark.slow
def test_sigkill_loses_no_acknowledged_write(database_url: str, data_dir: Path) -> None:
    """A child ingests (adds, deletes, re-embeds) and prints each id once its call returned; we SIGKILL it
    mid-run, twice (the second run starts from the first crash's state), then check everything."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    added: set[str] = set()
    deleted: set[str] = set()
    reembedded: set[str] = set()
    in_flight: set[str] = set()  # ids the operation running at the kill may or may not have changed
    last: list[str] = []

    def record(line: str) -> bool:
        kind, *ids = line.split()
        {"A": added, "D": deleted, "R": reembedded}[kind].update(ids)
        last[:] = [kind, *ids]
        return kind == "A"

    for prefix, kill_after in (("a", 40), ("b", 55)):  # batches acknowledged before the kill
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, database_url, str(data_dir), prefix],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        assert proc.stdout is not None and proc.stderr is not None
        acks = 0
        try:
            for line in proc.stdout:
                acks += record(line)
                if acks >= kill_after:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            for line in proc.stdout:  # printed before it died: acknowledged too
                record(line)
            proc.wait(timeout=60)
            assert acks >= kill_after, f"child ended early: {proc.stderr.read()}"
            assert proc.returncode == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        # the child's next step after its last acknowledged line (see CHILD)
        kind, first = last[0], last[1]
        b = int(first[len(prefix) :].split("-")[0])
        if kind == "A" and b % 4 == 3:
            in_flight.add(f"{prefix}{b - 1}-0")  # the delete
        elif kind == "D":
            in_flight.add(f"{prefix}{b - 1}-1")  # the re-embed (D names batch b-1, R batch b-2 = (b-1)-1)
        else:  # the next add: after batch b's "A", or after "R" (which names batch b-2 of its round)
            nxt = b + 1 if kind == "A" else b + 3
            in_flight.update(f"{prefix}{nxt}-{j}" for j in range(8))

    expected = sorted(added - deleted - in_flight)
    assert len(expected) > 700
    with Gallery.open(database_url, data_dir) as g:
        faiss_count, sql_count = g.consistency("v1")
        assert faiss_count == sql_count
        records = g.get_items(expected)
        assert set(records) == set(expected), (
            f"lost acknowledged items: {sorted(set(expected) - set(records))[:5]}"
        )
        assert not g.get_items(sorted(deleted - in_flight)), "acknowledged deletes came back"
        assert sql_count - len(expected) == len(g.get_items(sorted(in_flight)))
        # every acknowledged item is searchable by its current vector and reports the right version
        vecs = np.stack([_vec(e + "x" if e in reembedded else e) for e in expected])
        for e, row in zip(expected, g.search("v1", vecs, 1), strict=True):
            assert row[0].external_id == e and row[0].score > 0.9999
            assert row[0].embedded_by == ("v2" if e in reembedded else "v1")
