"""On-disk snapshots of a space's index: the FAISS index, its id lookup, and a JSON sidecar.

Files, all under the gallery's own ``<data_dir>/index/`` (space names are validated, see
:func:`index.validation.check_name`, so they cannot escape it):

- ``<space>.faiss``: the ``IndexIDMap2`` (``faiss.write_index``);
- ``<space>.entries.npz``: the live lookup vec_id -> (item_id, external_id, version), as arrays
  (``vec_ids``, ``item_ids`` int64; ``version_codes`` int32 into ``versions``; external ids NUL-joined
  UTF-8), so a reopen need not list the whole space from SQL;
- ``<space>.json``: format, factory, dim, counts, the *watermark* (the largest vec_id in the snapshot) and
  the sha256 of the two files above; the sidecar carries the sha256 of its own content too.

Each file is written to a temp file, fsynced and moved into place with ``os.replace`` (:mod:`index.atomic`), the
sidecar last: it is the commit point of a snapshot. A snapshot is used whole or not at all: the loader
checks the sidecar's own checksum (and that its bytes are exactly what the writer renders), then each
file's checksum *before* handing it to a parser (FAISS deserialises whatever it is given), then that the
lookup's ids are a subset of the index's ids and that the counts agree. Any failure (a crash between the
replaces leaves files of different generations; a damaged disk; any exception of a reader) means None,
logged, and the space is rebuilt from SQL. Checksums cannot tell a snapshot written wrong from a right
one: :mod:`index.snapshot_check` compares a sample with SQL for that.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import faiss
import numpy as np

from . import atomic

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = 3  # 3: checksums (a format-2 snapshot is rebuilt from SQL once)

# (item_id, external_id, embedded_by version)
Entry = tuple[int, str, str]


@dataclass(frozen=True)
class SnapshotInfo:
    """The JSON sidecar. ``watermark``: largest vec_id in the snapshot (0 if empty); ``live``: lookup size;
    ``index_sha256``/``entries_sha256``: hex sha256 of the ``.faiss`` and ``.entries.npz`` files (set by
    :func:`write`)."""

    space: str
    factory: str
    built_factory: str
    dim: int
    ntotal: int
    live: int
    watermark: int
    format: int = SNAPSHOT_FORMAT
    created_at: float = 0.0
    index_sha256: str = ""
    entries_sha256: str = ""


@dataclass
class EntryArrays:
    """The id lookup as arrays, sorted by vec_id."""

    vec_ids: np.ndarray  # (n,) int64
    item_ids: np.ndarray  # (n,) int64
    external_ids: list[str]
    versions: list[str]  # per row

    @classmethod
    def from_dict(cls, entries: dict[int, Entry]) -> EntryArrays:
        vec_ids = np.fromiter(entries.keys(), dtype=np.int64, count=len(entries))
        order = np.argsort(vec_ids, kind="stable")
        if entries:
            item_ids, ext_ids, versions = zip(*entries.values(), strict=True)
        else:
            item_ids, ext_ids, versions = (), (), ()
        ext = [ext_ids[i] for i in order.tolist()]
        ver = [versions[i] for i in order.tolist()]
        return cls(vec_ids[order], np.asarray(item_ids, dtype=np.int64).reshape(-1)[order], ext, ver)

    def to_dict(self) -> dict[int, Entry]:
        interned: dict[str, str] = {}
        versions = list(map(interned.setdefault, self.versions, self.versions))  # share version strings
        return dict(
            zip(
                self.vec_ids.tolist(),
                zip(self.item_ids.tolist(), self.external_ids, versions, strict=True),
                strict=True,
            )
        )


def paths(index_dir: Path, space: str) -> tuple[Path, Path, Path]:
    """``(<space>.faiss, <space>.entries.npz, <space>.json)`` under ``index_dir``."""
    return index_dir / f"{space}.faiss", index_dir / f"{space}.entries.npz", index_dir / f"{space}.json"


def write(
    index_dir: Path, index: faiss.IndexIDMap2, entries: EntryArrays, info: SnapshotInfo
) -> SnapshotInfo:
    """Write the three files atomically each (temp, fsync, replace), the sidecar last; returns ``info``
    with the files' checksums, as written in the sidecar."""
    index_dir.mkdir(parents=True, exist_ok=True)
    faiss_path, entries_path, meta_path = paths(index_dir, info.space)
    # checksums are taken of the temp files as written (read back from the page cache), not of the objects
    with atomic.replacing(faiss_path, sync_dir=False) as tmp:
        faiss.write_index(index, str(tmp))
        index_sha256 = sha256_file(tmp)
    versions = sorted(set(entries.versions))
    code = {v: i for i, v in enumerate(versions)}
    with atomic.replacing(entries_path, sync_dir=False) as tmp:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                vec_ids=entries.vec_ids,
                item_ids=entries.item_ids,
                version_codes=np.fromiter(
                    (code[v] for v in entries.versions), dtype=np.int32, count=len(entries.versions)
                ),
                versions=np.frombuffer(json.dumps(versions).encode(), dtype=np.uint8),
                external_ids=np.frombuffer("\x00".join(entries.external_ids).encode(), dtype=np.uint8),
            )
        entries_sha256 = sha256_file(tmp)
    info = replace(info, format=SNAPSHOT_FORMAT, index_sha256=index_sha256, entries_sha256=entries_sha256)
    atomic.write_bytes(meta_path, sidecar_bytes(info))  # last: the commit point; fsyncs the dir for all three
    return info


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in ``chunk``-byte pieces (no second copy of a large index in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode()


def sidecar_bytes(info: SnapshotInfo) -> bytes:
    """The sidecar file's exact content: ``{"info": {...}, "sha256": <hex sha256 of the canonical info>}``."""
    body = asdict(info)
    return _canonical({"info": body, "sha256": hashlib.sha256(_canonical(body)).hexdigest()})


def parse_sidecar(raw: bytes) -> SnapshotInfo:
    """The :class:`SnapshotInfo` of a sidecar's bytes; ``ValueError`` unless they are exactly what
    :func:`sidecar_bytes` renders for it (so any changed byte, even blank space, is refused)."""
    outer = json.loads(raw)
    if not isinstance(outer, dict) or set(outer) != {"info", "sha256"} or not isinstance(outer["info"], dict):
        raise ValueError("not a snapshot sidecar of this format")
    if hashlib.sha256(_canonical(outer["info"])).hexdigest() != outer["sha256"]:
        raise ValueError("sidecar checksum mismatch")
    info = SnapshotInfo(**outer["info"])
    if sidecar_bytes(info) != raw:
        raise ValueError("sidecar bytes differ from their canonical form")
    return info


@dataclass
class Loaded:
    index: faiss.IndexIDMap2
    info: SnapshotInfo
    entries: EntryArrays


def read(index_dir: Path, space: str, dim: int, factory: str) -> Loaded | None:
    """Load a space's snapshot if present, intact and made for ``dim`` and ``factory``; else None (logged).

    Never raises: a snapshot only makes reopening faster, so any failure to read one (a damaged file
    raises whatever its parser raises: ``zipfile.BadZipFile``, ``RuntimeError``, ``MemoryError``...) means
    rebuilding from SQL, never a failed open.
    """
    try:
        return _read(index_dir, space, dim, factory)
    except Exception as e:
        log.warning(
            "space %r: unreadable snapshot under %s (%s: %s); rebuilding from SQL",
            space,
            index_dir,
            type(e).__name__,
            e,
        )
        return None


def _read(index_dir: Path, space: str, dim: int, factory: str) -> Loaded | None:
    faiss_path, entries_path, meta_path = paths(index_dir, space)
    if not faiss_path.exists() or not meta_path.exists():
        return None
    outside = _not_own_files(index_dir, (faiss_path, entries_path, meta_path))
    if outside:
        # FAISS deserialises whatever it is given: only files of our own index dir are ever read
        log.warning(
            "space %r: snapshot file %s is a link or lies outside %s: ignored, rebuilding from SQL",
            space,
            outside,
            index_dir,
        )
        return None
    raw = meta_path.read_bytes()
    if _is_older_format(raw):
        log.info("space %r: snapshot of an older format; rebuilding from SQL", space)
        return None
    try:
        info = parse_sidecar(raw)
    except (ValueError, TypeError) as e:
        log.warning("space %r: damaged snapshot sidecar %s (%s); rebuilding from SQL", space, meta_path, e)
        return None
    if info.format != SNAPSHOT_FORMAT or info.dim != dim or info.factory != factory or info.space != space:
        log.info(
            "space %r: snapshot is for factory %r dim %d (format %d), want %r dim %d; rebuilding",
            space,
            info.factory,
            info.dim,
            info.format,
            factory,
            dim,
        )
        return None
    for path, want in ((faiss_path, info.index_sha256), (entries_path, info.entries_sha256)):
        # before any parser sees the bytes: a damaged index can deserialise into garbage, or worse
        got = sha256_file(path) if path.exists() else "missing"
        if got != want:
            log.warning(
                "space %r: snapshot file %s does not match its checksum (%s, sidecar says %s): damaged "
                "or of another generation; rebuilding from SQL",
                space,
                path,
                got[:16],
                want[:16],
            )
            return None
    index = faiss.read_index(str(faiss_path))
    if not isinstance(index, faiss.IndexIDMap2) or index.d != dim:
        log.warning("space %r: snapshot %s is not an IDMap2 of dim %d; rebuilding", space, faiss_path, dim)
        return None
    entries = _read_entries(entries_path)
    index_ids = np.sort(faiss.vector_to_array(index.id_map))
    pos = np.searchsorted(index_ids, entries.vec_ids).clip(max=max(len(index_ids) - 1, 0))
    subset = len(entries.vec_ids) == 0 or (
        len(index_ids) > 0 and bool((index_ids[pos] == entries.vec_ids).all())
    )
    if not subset or len(entries.vec_ids) != info.live or index.ntotal != info.ntotal:
        log.warning("space %r: snapshot files disagree with each other; rebuilding from SQL", space)
        return None
    return Loaded(index, info, entries)


def _is_older_format(raw: bytes) -> bool:
    """Whether a sidecar parses as the flat JSON of format 2 or earlier (not damage: an upgrade)."""
    try:
        data = json.loads(raw)
    except ValueError:
        return False
    return isinstance(data, dict) and isinstance(data.get("format"), int) and data["format"] < SNAPSHOT_FORMAT


def _not_own_files(index_dir: Path, files: tuple[Path, ...]) -> Path | None:
    """The first of ``files`` (or ``index_dir`` itself) that is a symbolic link or resolves outside
    ``index_dir``; None when all are plain files of it."""
    if index_dir.is_symlink():
        return index_dir
    root = index_dir.resolve()
    for f in files:
        if f.is_symlink() or (f.exists() and f.resolve().parent != root):
            return f
    return None


def _read_entries(path: Path) -> EntryArrays:
    """The lookup file as arrays; ``ValueError`` when its arrays disagree (its checksum was checked)."""
    with np.load(path, allow_pickle=False) as z:
        vec_ids = z["vec_ids"].astype(np.int64, copy=False)
        item_ids = z["item_ids"].astype(np.int64, copy=False)
        codes = z["version_codes"]
        versions = json.loads(z["versions"].tobytes().decode())
        blob = z["external_ids"].tobytes().decode()
    ext_ids = blob.split("\x00") if len(vec_ids) else []
    if not (len(ext_ids) == len(vec_ids) == len(item_ids) == len(codes)) or (
        len(codes) and (codes.min() < 0 or codes.max() >= len(versions))
    ):
        raise ValueError(f"inconsistent snapshot lookup {path}")
    return EntryArrays(vec_ids, item_ids, ext_ids, [versions[c] for c in codes.tolist()])


def new_info(
    space: str, factory: str, built_factory: str, dim: int, index: faiss.IndexIDMap2, live: int
) -> SnapshotInfo:
    ids = faiss.vector_to_array(index.id_map)
    return SnapshotInfo(
        space=space,
        factory=factory,
        built_factory=built_factory,
        dim=dim,
        ntotal=int(index.ntotal),
        live=live,
        watermark=int(ids.max()) if len(ids) else 0,
        created_at=time.time(),
    )
