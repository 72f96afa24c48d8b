"""Shared fixtures: a tiny seeded synthetic dataset in the IDX format, so tests never need the real one."""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from index.db import make_engine
from index.tables import drop_schema


def _write_idx(path: Path, arr: np.ndarray) -> None:
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def make_images(labels: np.ndarray, rng: np.random.Generator, size: int = 28, classes: int = 10) -> np.ndarray:
    """Each class is a fixed random blob pattern; each image that pattern shifted a little, plus noise."""
    templates = np.random.default_rng(1234).random((classes, size, size)) > 0.72
    out = np.empty((len(labels), size, size), dtype=np.uint8)
    for i, c in enumerate(labels):
        img = np.roll(templates[c], shift=tuple(rng.integers(-1, 2, size=2)), axis=(0, 1)).astype(np.float32) * 200
        img += rng.normal(0, 25, size=(size, size))
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def write_tiny_dataset(root: Path, per_class_train: int = 40, per_class_test: int = 20, seed: int = 0) -> Path:
    """IDX files named like Fashion-MNIST's, with 10 classes of synthetic 28x28 images."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, per in (("train", per_class_train), ("t10k", per_class_test)):
        labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), per))
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", make_images(labels, rng))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


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
def module_database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Like ``database_url``, shared by a module's tests (for read-mostly fixtures)."""
    yield from _database_url(request.param, tmp_path_factory.mktemp("db"))
