"""Every bad input is refused with a typed error and a clear message, and leaves the gallery unchanged."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from index import (
    DimensionMismatch,
    DuplicateIds,
    Gallery,
    GalleryClosed,
    InvalidEmbedding,
    InvalidInput,
    ItemNotFound,
    NewItem,
    SpaceMismatch,
    UnknownSpace,
    UnknownVersion,
    VersionConflict,
    VersionInfo,
)
from tests.index._gallery_data import answers, items, random_vectors

X = random_vectors(30, 16, seed=11)
Q = random_vectors(5, 16, seed=12)
GOOD = random_vectors(1, 16, seed=13)[0]


@pytest.fixture(scope="module")
def populated(module_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gallery]:
    """One gallery for all cases: each case must leave it unchanged, which is what is tested."""
    with Gallery.open(module_database_url, tmp_path_factory.mktemp("data")) as g:
        g.register_version(VersionInfo("v1", space="v1", embedding_dim=16))
        g.register_version(VersionInfo("other", space="o", embedding_dim=8))
        g.register_version(VersionInfo("old", space="v1", embedding_dim=16))
        g.add(items(X[:20]), "v1")
        g.add(items(X[20:], start=20), "old")
        g.set_version_status("old", "retired")
        g.set_active_version("v1")
        yield g


def state(g: Gallery) -> Any:
    return (
        g.count(),
        g.count("v1"),
        g.counts_by_version(),
        g.counts_by_space(),
        g.consistency("v1"),
        [(v.version, v.status) for v in g.list_versions()],
        g.active_version(),
        answers(g, "v1", Q, 8),
        g.get_metadata([f"item{i}" for i in range(30)]),
    )


def new(eid: str = "new0", vec: Any = GOOD, meta: Any = None) -> NewItem:
    return NewItem(eid, vec, metadata=meta)


CASES: list[tuple[str, Callable[[Gallery], Any], type[Exception], str]] = [
    (
        "wrong dim",
        lambda g: g.add([new(vec=np.ones(64, np.float32))], "v1"),
        DimensionMismatch,
        "embedding of 'new0' dim 64 does not match space 'v1' (dim 16)",
    ),
    (
        "wrong dim in 2nd item",
        lambda g: g.add([new(), new("new1", np.ones(8))], "v1"),
        DimensionMismatch,
        "'new1' dim 8",
    ),
    ("NaN", lambda g: g.add([new(vec=np.full(16, np.nan))], "v1"), InvalidEmbedding, "NaN or inf"),
    (
        "inf",
        lambda g: g.add([new(), new("new1", np.r_[np.inf, np.ones(15)])], "v1"),
        InvalidEmbedding,
        "embedding of 'new1' contains NaN or inf",
    ),
    (
        "ints",
        lambda g: g.add([new(vec=np.arange(16))], "v1"),
        InvalidEmbedding,
        "floating point, not dtype int64",
    ),
    ("strings", lambda g: g.add([new(vec=["a"] * 16)], "v1"), InvalidEmbedding, "floating point"),
    ("object", lambda g: g.add([new(vec=np.array([None] * 16))], "v1"), InvalidEmbedding, "floating point"),
    ("ragged", lambda g: g.add([new(vec=[[1.0], [1.0, 2.0]])], "v1"), InvalidEmbedding, "numeric array"),
    ("2-D vector", lambda g: g.add([new(vec=np.ones((2, 16)))], "v1"), InvalidEmbedding, "shape (16,)"),
    ("zero vector", lambda g: g.add([new(vec=np.zeros(16))], "v1"), InvalidEmbedding, "zero norm"),
    (
        "dup in batch",
        lambda g: g.add([new(), new("new1"), new()], "v1"),
        DuplicateIds,
        "duplicate external ids inside one batch: 'new0'",
    ),
    ("dup in upsert batch", lambda g: g.upsert([new("item1"), new("item1")], "v1"), DuplicateIds, "'item1'"),
    (
        "existing id",
        lambda g: g.add([new(), new("item3")], "v1"),
        DuplicateIds,
        "already in the gallery: 'item3'",
    ),
    ("unknown version", lambda g: g.add([new()], "v9"), UnknownVersion, "unknown model version 'v9'"),
    ("retired version", lambda g: g.add([new()], "old"), VersionConflict, "retired"),
    (
        "space mismatch on add",
        lambda g: g.add([new()], "v1", space="o"),
        SpaceMismatch,
        "version 'v1' embeds into space 'v1', not 'o'",
    ),
    (
        "metadata not JSON",
        lambda g: g.add([new(meta={"s": {1, 2}})], "v1"),
        InvalidInput,
        "not JSON-serialisable",
    ),
    (
        "metadata NaN",
        lambda g: g.add([new(meta={"x": float("nan")})], "v1"),
        InvalidInput,
        "not JSON-serialisable",
    ),
    ("empty external id", lambda g: g.add([new("")], "v1"), InvalidInput, "external id '' is invalid"),
    ("non-str external id", lambda g: g.add([new(7)], "v1"), InvalidInput, "external id 7 is invalid"),
    (
        "source_uri not str",
        lambda g: g.add([NewItem("n", GOOD, source_uri=3)], "v1"),
        InvalidInput,
        "source_uri",
    ),
    ("upsert wrong dim", lambda g: g.upsert([new("item2", np.ones(15))], "v1"), DimensionMismatch, "dim 15"),
    (
        "reembed unknown id",
        lambda g: g.reembed([("item1", GOOD), ("ghost", GOOD)], "v1"),
        ItemNotFound,
        "unknown external ids: 'ghost'",
    ),
    ("reembed NaN", lambda g: g.reembed([("item1", np.full(16, np.nan))], "v1"), InvalidEmbedding, "NaN"),
    (
        "reembed other space",
        lambda g: g.reembed([("item1", GOOD)], "v1", space="o"),
        SpaceMismatch,
        "not 'o'",
    ),
    ("delete unknown", lambda g: g.delete(["item1", "ghost"]), ItemNotFound, "'ghost'"),
    ("delete dup", lambda g: g.delete(["item1", "item1"]), DuplicateIds, "'item1'"),
    (
        "search unknown space",
        lambda g: g.search("nope", Q, 3),
        UnknownSpace,
        "unknown embedding space 'nope'",
    ),
    (
        "search wrong dim",
        lambda g: g.search("v1", np.ones((2, 8), np.float32), 3),
        DimensionMismatch,
        "query dim 8 does not match space 'v1' (dim 16)",
    ),
    ("search NaN", lambda g: g.search("v1", np.full((1, 16), np.nan), 3), InvalidEmbedding, "query row 0"),
    (
        "search ints",
        lambda g: g.search("v1", np.ones((1, 16), np.int32), 3),
        InvalidEmbedding,
        "floating point",
    ),
    ("search 3-D", lambda g: g.search("v1", np.ones((1, 1, 16)), 3), InvalidEmbedding, "shape"),
    ("search k=0", lambda g: g.search("v1", Q, 0), InvalidInput, "k must be an integer >= 1"),
    ("search k str", lambda g: g.search("v1", Q, "3"), InvalidInput, "k must be"),
    (
        "search version of other space",
        lambda g: g.search("v1", Q, 3, version="other"),
        SpaceMismatch,
        "version 'other' embeds into space 'o', not 'v1'",
    ),
    (
        "register dim mismatch",
        lambda g: g.register_version(VersionInfo("v3", space="v1", embedding_dim=32)),
        DimensionMismatch,
        "dim 32 does not match space 'v1' (dim 16)",
    ),
    (
        "register bad space",
        lambda g: g.register_version(VersionInfo("v3", space="../etc", embedding_dim=4)),
        InvalidInput,
        "space name '../etc' is invalid",
    ),
    (
        "register bad dim",
        lambda g: g.register_version(VersionInfo("v3", space="x", embedding_dim=0)),
        InvalidInput,
        "embedding_dim",
    ),
    ("activate unknown", lambda g: g.set_active_version("v9"), UnknownVersion, "'v9'"),
    ("bad status", lambda g: g.set_version_status("v1", "zombie"), InvalidInput, "status"),
    ("count unknown space", lambda g: g.count("nope"), UnknownSpace, "'nope'"),
]


@pytest.mark.parametrize(("name", "op", "error", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(
    populated: Gallery, name: str, op: Callable[[Gallery], Any], error: type[Exception], message: str
) -> None:
    before = state(populated)
    with pytest.raises(error) as exc:
        op(populated)
    assert message in str(exc.value)
    assert state(populated) == before


def test_every_error_is_a_gallery_error() -> None:
    from index import GalleryError

    for _, _, error, _ in CASES:
        assert issubclass(error, GalleryError)


def test_closed_gallery_refuses(gallery: Gallery) -> None:
    gallery.close()
    with pytest.raises(GalleryClosed):
        gallery.search("v1", Q, 1)
    with pytest.raises(GalleryClosed):
        gallery.add([new()], "v1")
    gallery.close()  # idempotent


@pytest.mark.parametrize(("factory", "message"), [("PQ5", "PQ5"), ("Nonsense42", "Nonsense42")])
def test_factory_that_cannot_index_the_dim_is_refused_before_registering(
    database_url: str, tmp_path, factory: str, message: str
) -> None:
    with Gallery.open(database_url, tmp_path / "d", index_factory=factory) as g:
        with pytest.raises(InvalidInput, match=message):
            g.register_version(VersionInfo("v1", space="v1", embedding_dim=16))
        assert g.list_versions() == [] and g.spaces() == []
