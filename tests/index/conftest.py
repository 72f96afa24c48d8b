"""Fixtures for the gallery tests: a database URL (SQLite always, PostgreSQL when configured) and data."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from index import Gallery, VersionInfo
from index.db import make_engine
from index.tables import drop_schema

POSTGRES_ENV = "GRACEFUL_TEST_POSTGRES_URL"


def _reset_postgres(url: str) -> None:
    engine = make_engine(url)
    try:
        drop_schema(engine)
    finally:
        engine.dispose()


def _database_url(param: str, folder: Path) -> Iterator[str]:
    if param == "sqlite":
        yield f"sqlite:///{folder / 'gallery.db'}"
        return
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_ENV} is not set")
    _reset_postgres(url)
    yield url
    _reset_postgres(url)


DATABASES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file under tmp_path, or the PostgreSQL server named by
    ``GRACEFUL_TEST_POSTGRES_URL`` (its gallery tables dropped before and after; skipped when unset)."""
    yield from _database_url(request.param, tmp_path)


@pytest.fixture(scope="module", params=DATABASES)
def module_database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Like ``database_url``, shared by a module's tests (for read-mostly fixtures)."""
    yield from _database_url(request.param, tmp_path_factory.mktemp("db"))


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
