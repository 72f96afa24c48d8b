"""IndexConfig: one frozen value holds the index options; Gallery.open takes it, and its older keyword
arguments still work, folding into it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from index import Gallery, IndexConfig, VersionInfo
from index.config import DEFAULT_SNAPSHOT_EVERY
from tests.index._gallery_data import items, random_vectors

X = random_vectors(60, 16, seed=81)


def test_defaults_are_those_of_gallery_open_and_frozen() -> None:
    c = IndexConfig()
    assert (
        c.factory,
        c.params,
        c.min_train,
        c.tombstone_fraction,
        c.background_builds,
        c.recall_sample,
        c.snapshot_every,
        c.faiss_threads,
    ) == ("Flat", None, None, 0.2, False, 1000, DEFAULT_SNAPSHOT_EVERY, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.factory = "HNSW16"  # type: ignore[misc]


def test_overridden_takes_the_older_names_and_ignores_unset() -> None:
    from index.config import UNSET

    c = IndexConfig(factory="HNSW16", recall_sample=5).overridden(
        index_factory=UNSET, index_params="efSearch=64", snapshot_every=None, recall_sample=UNSET
    )
    assert c == IndexConfig(factory="HNSW16", params="efSearch=64", snapshot_every=None, recall_sample=5)
    with pytest.raises(TypeError, match="nope"):
        IndexConfig().overridden(nope=1)


def _space(g: Gallery) -> tuple[str, str | None, int, float, bool]:
    sidx = g._space_index("v1")
    return sidx.factory, sidx.params, sidx.min_train, sidx.tombstone_fraction, sidx.background


@pytest.mark.parametrize("how", ["config", "keywords", "positional", "both"])
def test_open_with_a_config_or_the_older_keywords_is_the_same(
    database_url: str, tmp_path: Path, how: str
) -> None:
    want = IndexConfig(
        factory="IVF4,Flat",
        params="nprobe=2",
        min_train=40,
        tombstone_fraction=0.5,
        snapshot_every=None,
        recall_sample=50,
    )
    if how == "config":
        g = Gallery.open(database_url, tmp_path / "d", config=want)
    elif how == "keywords":
        g = Gallery.open(
            database_url,
            tmp_path / "d",
            index_factory="IVF4,Flat",
            index_params="nprobe=2",
            min_train=40,
            tombstone_fraction=0.5,
            snapshot_every=None,
            recall_sample=50,
        )
    elif how == "positional":  # as service/app.py calls it
        g = Gallery.open(
            database_url,
            tmp_path / "d",
            "IVF4,Flat",
            None,
            index_params="nprobe=2",
            min_train=40,
            tombstone_fraction=0.5,
            recall_sample=50,
        )
    else:  # keywords given override the config's fields
        g = Gallery.open(
            database_url,
            tmp_path / "d",
            config=dataclasses.replace(want, factory="Flat", min_train=9),
            index_factory="IVF4,Flat",
            min_train=40,
        )
    with g:
        assert g.config == want
        g.register_version(VersionInfo("v1", space="v1", embedding_dim=16))
        g.add(items(X), "v1")
        assert _space(g) == ("IVF4,Flat", "nprobe=2", 40, 0.5, False)
        assert g.index_info("v1")["built_factory"] == "IVF4,Flat"
        assert g._builder.recall_sample == 50
        assert [row[0].external_id for row in g.search("v1", X, 1)] == [f"item{i}" for i in range(60)]
