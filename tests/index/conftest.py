"""Fixtures for the gallery tests: a database URL (SQLite always, PostgreSQL when configured) and data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from index import Gallery, VersionInfo


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def gallery(database_url: str, data_dir: Path) -> Iterator[Gallery]:
    """An open Flat gallery with version ``v1`` (space ``v1``, dim 16) registered."""
    g = Gallery.open(database_url, data_dir)
    g.register_version(VersionInfo("v1", space="v1", embedding_dim=16))
    yield g
    g.close()
