"""The one way the service gets a loaded model: the active version first, then a small LRU of others.

Every user of a loaded version (hot swap, backfill jobs, the cost report, the curve's simulation) goes
through :class:`ModelCache`, so a version is loaded once and memory stays bounded: at most ``capacity``
versions besides the active one are kept (a backfill's candidate and the gallery's model are the common
pair).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

from service.errors import InvalidModel, ServiceError
from service.models.registry import ModelRegistry
from trainer import LoadedModel, ModelCardError, load_model

log = logging.getLogger(__name__)


class ModelCache:
    """Loaded models by version. Thread-safe; a load happens outside the lock of other versions' hits."""

    def __init__(self, registry: ModelRegistry, capacity: int = 2) -> None:
        self.registry = registry
        self.capacity = max(int(capacity), 0)
        self._active: LoadedModel | None = None
        self._others: OrderedDict[str, LoadedModel] = OrderedDict()
        self._stamps: dict[str, tuple[int, int] | None] = {}  # version -> (mtime_ns, size) of its weights
        self._lock = threading.Lock()
        self._loading = threading.Lock()  # one load at a time: two threads asking for v2 load it once

    def set_active(self, loaded: LoadedModel) -> None:
        """The hot swap tells the cache which loaded model serves now (kept outside the LRU)."""
        with self._lock:
            previous, self._active = self._active, loaded
            self._others.pop(loaded.version, None)
            if previous is not None and previous.version != loaded.version:
                self._keep(previous)  # the rollback target stays warm while there is room

    def _keep(self, loaded: LoadedModel) -> None:
        if self.capacity == 0:
            return
        self._stamps[loaded.version] = self._stamp(loaded)
        self._others[loaded.version] = loaded
        self._others.move_to_end(loaded.version)
        while len(self._others) > self.capacity:
            dropped, _ = self._others.popitem(last=False)
            log.debug("model cache: dropped %s", dropped)

    @staticmethod
    def _stamp(loaded: LoadedModel) -> tuple[int, int] | None:
        try:
            st = os.stat(Path(loaded.path) / loaded.card.weights)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _hit(self, version: str) -> LoadedModel | None:
        with self._lock:
            if self._active is not None and self._active.version == version:
                return self._active  # serving: never dropped behind the requests' back
            hit = self._others.get(version)
            if hit is None:
                return None
            # a folder changed or removed on disk since it was loaded: load (and verify) it again
            if self._stamps.get(version) != self._stamp(hit):
                del self._others[version]
                return None
            self._others.move_to_end(version)
            return hit

    def get(self, version: str) -> LoadedModel:
        """The loaded model of ``version``. Raises ModelNotFound / InvalidModel (the registry's, or a
        folder that verified but does not load)."""
        hit = self._hit(version)
        if hit is not None:
            return hit
        with self._loading:
            hit = self._hit(version)
            if hit is not None:
                return hit
            entry = self.registry.entry(version)
            try:
                loaded = load_model(entry.path)
            except ModelCardError as e:
                raise InvalidModel(
                    f"model version {version!r} is refused: {self.registry.public(str(e))}"
                ) from None
            with self._lock:
                self._keep(loaded)
            return loaded

    def get_or_none(self, version: str) -> LoadedModel | None:
        """Like :meth:`get`, None when the version cannot be loaded (callers that leave it unscored)."""
        try:
            return self.get(version)
        except (ServiceError, ModelCardError) as e:  # a version without a loadable folder
            log.warning("cannot load model %s: %s", version, e)
            return None

    def cached_versions(self) -> list[str]:
        with self._lock:
            return ([self._active.version] if self._active else []) + list(self._others)
