"""How a gallery builds, serves and snapshots its FAISS indexes: one frozen value passed everywhere.

:class:`IndexConfig` holds the options that :meth:`index.Gallery.open` used to take (and still takes) as
loose keyword arguments, and that the gallery handed on to each space's :class:`index.space_index.SpaceIndex`
and to the background :class:`index.background_build.IndexBuilder`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields, replace
from typing import Any

DEFAULT_SNAPSHOT_EVERY = 100_000


@dataclass(frozen=True)
class IndexConfig:
    """Index options of a gallery (the same for every space).

    - ``factory``: FAISS factory string ("Flat", "HNSW32", "IVF1024,Flat", ...), always wrapped in an
      ``IndexIDMap2`` with inner product. Changing it rebuilds indexes from SQL.
    - ``params``: FAISS ParameterSpace string, e.g. "efSearch=128" or "nprobe=32" (None: nprobe=16 for IVF,
      efSearch=128 for HNSW; "": FAISS's own defaults).
    - ``min_train``: vectors needed before a trainable (IVF) index is trained; until then the space is
      served by an exact Flat index. None: 39 x nlist.
    - ``tombstone_fraction``: rebuild an index that cannot remove ids (HNSW) when this share is stale.
    - ``background_builds``: build approximate indexes off to the side while the exact staging index (or
      the previous build) serves, measuring recall@10 on ``recall_sample`` stored vectors.
    - ``snapshot_every``: write a space's snapshot after this many vector changes (None: only on
      ``Gallery.snapshot`` and ``close``).
    - ``faiss_threads``: FAISS's OpenMP threads, set by ``Gallery.open`` for its calling thread (None:
      leave as is).
    """

    factory: str = "Flat"
    params: str | None = None
    min_train: int | None = None
    tombstone_fraction: float = 0.2
    background_builds: bool = False
    recall_sample: int = 1000
    snapshot_every: int | None = DEFAULT_SNAPSHOT_EVERY
    faiss_threads: int | None = None

    def overridden(self, **options: Any) -> IndexConfig:
        """A copy with the given fields replaced, ignoring those passed as :data:`UNSET`.

        Also takes ``Gallery.open``'s older keyword names (``index_factory``, ``index_params``), so the
        keywords a caller did pass fold into a config. Unknown names raise ``TypeError``.
        """
        names = {f.name for f in fields(self)}
        changes: dict[str, Any] = {}
        for name, value in options.items():
            field = _LEGACY_NAMES.get(name, name)
            if field not in names:
                raise TypeError(f"IndexConfig has no option {name!r}")
            if value is not UNSET:
                changes[field] = value
        return replace(self, **changes) if changes else self


class Unset(enum.Enum):
    """The type of :data:`UNSET`: a keyword argument the caller did not pass (None means something)."""

    UNSET = "unset"


UNSET = Unset.UNSET

_LEGACY_NAMES = {"index_factory": "factory", "index_params": "params"}
