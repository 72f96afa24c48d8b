"""Atomic file replacement (index.atomic): a reader sees the old file or the new one, never a mix, and a
failed write leaves the old file and no temp file behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from index import atomic


def test_write_bytes_replaces_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    target.write_bytes(b"old")
    atomic.write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic.replacing(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer died")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_stale_temp_files_of_dead_writers_only_are_removed(tmp_path: Path) -> None:
    dead = tmp_path / ".v1.faiss.999999999.tmp"  # no such pid
    alive = tmp_path / f".v1.faiss.{os.getppid()}.tmp"  # a running process (our parent)
    other = tmp_path / ".notes.tmp"  # not named like ours
    for p in (dead, alive, other):
        p.write_bytes(b"x")
    atomic.remove_stale_temp_files(tmp_path)
    assert not dead.exists() and alive.exists() and other.exists()
