"""Fixtures for service tests: tiny trained model versions and real servers on loopback."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from service.images import encode_png_base64
from tests.service.server import Server
from trainer.data import Dataset, load_split, query_gallery_split
from trainer.train import TrainConfig, train

API_KEY = "test-key"


@pytest.fixture(scope="session")
def tiny_models(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """v1 (classes 0-4), v2 (BCT child of v1, all classes, wider), v2-indep (all classes, no BCT)."""
    root = tmp_path_factory.mktemp("service-models")
    common = dict(data=str(tiny_data), epochs=2, batch_size=64, threads=1)
    train(TrainConfig(out=str(root / "v1"), classes="0-4", **common))
    train(TrainConfig(out=str(root / "v2"), old=str(root / "v1"), bct="full", width=12, **common))
    train(TrainConfig(out=str(root / "v2-indep"), seed=1, **common))
    return root


@pytest.fixture(scope="session")
def tiny_test(tiny_data: Path) -> Dataset:
    return load_split(tiny_data, "test")


@pytest.fixture(scope="session")
def split(tiny_test: Dataset) -> tuple[np.ndarray, np.ndarray]:
    return query_gallery_split(len(tiny_test))


def item_payload(ds: Dataset, indices, prefix: str = "g") -> list[dict]:
    return [{"external_id": f"{prefix}{i}", "image_base64": encode_png_base64(ds.images[i]),
             "metadata": {"label": int(ds.labels[i])}} for i in indices]


@pytest.fixture
def make_server(tmp_path: Path, tiny_models: Path, database_url: str) -> Iterator[Callable[..., Server]]:
    """Build servers over one data dir + models dir copy (so restarts see the same state)."""
    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    servers: list[Server] = []

    def make(**env: str) -> Server:
        base = {"GRACEFUL_MODELS_DIR": str(models), "GRACEFUL_DATA_DIR": str(tmp_path / "data"),
                "GRACEFUL_DATABASE_URL": database_url, "GRACEFUL_API_KEY": API_KEY,
                "GRACEFUL_ACTIVE_MODEL": "v1", "GRACEFUL_TORCH_THREADS": "1",
                "GRACEFUL_THROUGHPUT_PROBE_IMAGES": "64"}
        s = Server({**base, **env}, tmp_path / "server.log")
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()
