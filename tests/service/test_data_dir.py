"""FAISS files are only read from the service's own data dir: a snapshot reached through a link is never
handed to FAISS; the index is rebuilt from SQL instead."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from index import Gallery, NewItem, VersionInfo
from index import snapshot as snapshot_mod


def _snapshotted_gallery(data: Path) -> np.ndarray:
    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    with Gallery.open(None, data) as g:
        g.register_version(VersionInfo("v", space="v", embedding_dim=8))
        g.add([NewItem(f"i{i}", v) for i, v in enumerate(x)], "v")
        g.snapshot()
    return x


@pytest.mark.parametrize("how", ["file", "dir"])
def test_faiss_files_are_only_read_from_the_own_data_dir(tmp_path, monkeypatch, how):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    x = _snapshotted_gallery(data)
    elsewhere.mkdir()
    if how == "file":  # the index file replaced by a link to a file elsewhere
        shutil.move(data / "index" / "v.faiss", elsewhere / "v.faiss")
        (data / "index" / "v.faiss").symlink_to(elsewhere / "v.faiss")
    else:  # the whole index dir is a link to a folder elsewhere
        shutil.move(data / "index", elsewhere / "index")
        (data / "index").symlink_to(elsewhere / "index", target_is_directory=True)
    read: list[str] = []
    real_read = snapshot_mod.faiss.read_index
    monkeypatch.setattr(snapshot_mod.faiss, "read_index", lambda p, *a: read.append(p) or real_read(p, *a))
    with Gallery.open(None, data) as g:
        assert read == []  # FAISS was never handed the file
        assert [r.snapshot_used for r in g.last_open_reports] == [False]  # rebuilt from SQL instead
        assert g.search("v", x[7], 1)[0][0].external_id == "i7" and g.consistency("v") == (50, 50)
