"""Atomic file replacement, the one way the gallery writes files (snapshots, build reports).

A file is written to a temp file beside it (same directory, so the rename cannot cross file systems),
fsynced, moved over the target with ``os.replace`` (atomic: a reader sees the old file or the new one,
never a mix), and the directory is fsynced so the rename itself survives a power loss. Temp files are
named ``.<name>.<pid>.tmp``: hidden, and :func:`remove_stale_temp_files` can tell those of dead writers.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

_TMP_RE = re.compile(r"^\..+\.(\d+)\.tmp$")


def temp_path(path: Path) -> Path:
    """The temp file of ``path`` for this process: ``.<name>.<pid>.tmp`` in the same directory."""
    # the pid lets a later open remove temp files of dead writers only
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def replacing(path: Path, *, sync_dir: bool = True) -> Iterator[Path]:
    """Yield a temp path for the block to write; then fsync it, ``os.replace`` it onto ``path`` and (with
    ``sync_dir``) fsync the directory. If the block raises, the temp file is removed and ``path`` is left
    as it was. Writing several files in order? Pass ``sync_dir=False`` to all but the last: one directory
    fsync persists every rename before it."""
    tmp = temp_path(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def write_bytes(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    """Replace ``path`` by ``data`` atomically and durably (see :func:`replacing`)."""
    with replacing(path, sync_dir=sync_dir) as tmp:
        tmp.write_bytes(data)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported everywhere (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temp_files(directory: Path) -> None:
    """Remove temp files left in ``directory`` by a writer that died (its pid no longer runs)."""
    for p in directory.glob(".*.tmp"):
        m = _TMP_RE.match(p.name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid != os.getpid():
            try:
                os.kill(pid, 0)
                continue  # still running (or pid reused): leave it
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        p.unlink(missing_ok=True)
