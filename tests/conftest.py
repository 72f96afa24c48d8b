"""Shared fixtures: a tiny seeded synthetic dataset in the IDX format (written by tests.support.data), so tests
never need the real one; database URLs (SQLite, or PostgreSQL when configured)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from index.db import make_engine
from index.tables import drop_schema
from tests.support.data import write_tiny_dataset


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny-fmnist"))


POSTGRES_ENV = "GRACEFUL_TEST_POSTGRES_URL"
POSTGRES_SKIP = (
    f"PostgreSQL is not available: apt-get install postgresql (make test starts it), or set {POSTGRES_ENV}"
)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Every test marked ``postgres`` (a whole test, or the ``postgres`` param of the database fixtures)
    skips with the same reason when no server is given; `make test` starts one (scripts/run-tests.sh)."""
    if item.get_closest_marker("postgres") is not None and not os.environ.get(POSTGRES_ENV):
        pytest.skip(POSTGRES_SKIP)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """One line saying how many tests were skipped and why, grouped by reason (what to install to run them)."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    if reasons:
        counts = ", ".join(f"{reason} (x{n})" for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
        terminalreporter.write_line(f"{sum(reasons.values())} skipped: {counts}", yellow=True, bold=True)


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
        pytest.skip(POSTGRES_SKIP)
    _reset_postgres(url)
    yield url
    _reset_postgres(url)


DATABASES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file under tmp_path, or the PostgreSQL server named by
    ``GRACEFUL_TEST_POSTGRES_URL`` (its gallery tables dropped before and after; skipped, saying what to
    install, when unset: `make test` starts a throwaway server and sets it)."""
    yield from _database_url(request.param, tmp_path)


@pytest.fixture(scope="module", params=DATABASES)
def module_database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Like ``database_url``, shared by a module's tests (for read-mostly fixtures)."""
    yield from _database_url(request.param, tmp_path_factory.mktemp("db"))
