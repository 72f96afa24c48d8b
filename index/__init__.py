"""The gallery: a durable SQL + FAISS store of embeddings that knows which model version made each.

Public API (imported lazily, so ``import index.errors`` stays cheap and FAISS loads on first use)::

    from index import Gallery, IndexConfig, NewItem, VersionInfo, Hit
    g = Gallery.open(None, data_dir)            # SQLite at <data_dir>/gallery.db, a Flat index per space
    g = Gallery.open(None, data_dir, config=IndexConfig(factory="HNSW32"))
    g.register_version(VersionInfo("v1", space="v1", embedding_dim=128))
    g.add([NewItem("a", vec)], version="v1")
    g.search("v1", queries, k=10)               # -> list[list[Hit]]
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import (
    DimensionMismatch,
    DuplicateIds,
    GalleryClosed,
    GalleryError,
    InvalidEmbedding,
    InvalidInput,
    ItemNotFound,
    SpaceMismatch,
    UnknownSpace,
    UnknownVersion,
    VersionConflict,
)

if TYPE_CHECKING:
    from .backfill import BackfillJobInfo
    from .config import IndexConfig
    from .db import default_database_url, make_engine
    from .gallery import Gallery
    from .reconcile import ReconcileReport
    from .snapshot import SnapshotInfo
    from .store import ItemRecord
    from .tables import create_schema
    from .types import Hit, NewItem, VersionInfo

_LAZY = {
    "Gallery": "gallery",
    "IndexConfig": "config",
    "Hit": "types",
    "NewItem": "types",
    "VersionInfo": "types",
    "ItemRecord": "store",
    "BackfillJobInfo": "backfill",
    "ReconcileReport": "reconcile",
    "SnapshotInfo": "snapshot",
    "create_schema": "tables",
    "make_engine": "db",
    "default_database_url": "db",
}

__all__ = [
    "BackfillJobInfo",
    "DimensionMismatch",
    "DuplicateIds",
    "Gallery",
    "GalleryClosed",
    "GalleryError",
    "Hit",
    "IndexConfig",
    "InvalidEmbedding",
    "InvalidInput",
    "ItemNotFound",
    "ItemRecord",
    "NewItem",
    "ReconcileReport",
    "SnapshotInfo",
    "SpaceMismatch",
    "UnknownSpace",
    "UnknownVersion",
    "VersionConflict",
    "VersionInfo",
    "create_schema",
    "default_database_url",
    "make_engine",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'index' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
