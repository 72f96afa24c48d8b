"""The live model registry: which model versions exist, which one is active, and hot swaps between them.

Every valid folder of the models dir is registered in the gallery's catalog; invalid ones are listed with
the reason and never loaded. An adapter version (card with ``adapter_of``) is "the new model it names, then
the adapter": one version whose space is the old model's, so it activates over the old gallery with no
backfill; it is valid only while the new model's folder sits next to it. Activation loads and warms the new model *first*, checks it may serve over the
gallery (same embedding space as every stored item), persists it, and only then swaps one reference:
a request captures ``registry.active`` once, so requests in flight finish on the model they started with.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from index import Gallery, VersionInfo
from index.errors import GalleryError
from index.rwlock import RWLock
from service.errors import IncompatibleModel, InvalidModel, ModelNotFound, NoActiveModel, NothingToRollBack
from service.model_checks import check_weights
from trainer.artifact import LoadedModel, ModelCard, adapter_base_folder, embed_images, load_model, read_card
from trainer.errors import ModelCardError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActiveModel:
    """An immutable snapshot of the serving model; swapping replaces the whole object."""

    version: str
    space: str
    loaded: LoadedModel
    activated_at: float

    @property
    def card(self) -> ModelCard:
        return self.loaded.card

    @property
    def input_size(self) -> int:
        return int(self.loaded.preprocess.size)

    @property
    def channels(self) -> int:
        return int(self.loaded.preprocess.channels)

    def embed(self, images: np.ndarray) -> np.ndarray:
        """(N, C, H, W) uint8 -> (N, D) float32 unit-norm embeddings (for an adapter version: the new model's,
        mapped into the old space by the adapter)."""
        return embed_images(self.loaded, images)


@dataclass
class ModelEntry:
    """A folder of the models dir: its card if valid, else why it was refused."""

    version: str
    path: Path
    card: ModelCard | None = None
    error: str | None = None


@dataclass
class ActivationResult:
    version: str
    previous: str | None
    space: str
    seconds: float
    reembedded: int = 0
    warm_images: int = 0
    notes: list[str] = field(default_factory=list)


def backfill_report_url(candidate: str) -> str:
    return f"/v1/backfill/report?candidate={candidate}"


class ModelRegistry:
    """Model versions on disk + the active one. Thread-safe; activations are serialised."""

    def __init__(self, models_dir: Path, gallery: Gallery, *, torch_threads: int | None = None) -> None:
        self.models_dir = Path(models_dir)
        self.gallery = gallery
        self._entries: dict[str, ModelEntry] = {}
        self._active: ActiveModel | None = None
        self._lock = threading.Lock()  # one activation (or scan) at a time
        # Writers of embeddings (ingest) share this; an activation's check-and-swap takes it alone, so no
        # item lands in the old space between "the gallery is compatible" and the swap.
        self._swap = RWLock()
        if torch_threads:
            torch.set_num_threads(torch_threads)

    # ------------------------------------------------------------------ discovery
    def _inside_models_dir(self, path: Path) -> bool:
        root = self.models_dir.resolve()
        try:
            resolved = path.resolve(strict=True)
        except OSError:
            return False
        return resolved.parent == root and not path.is_symlink()

    def _read(self, path: Path) -> ModelEntry:
        entry = ModelEntry(version=path.name, path=path)
        if not self._inside_models_dir(path):
            entry.error = f"{path.name} is a link or lies outside the models dir {self.models_dir}: refused"
            return entry
        try:
            card = read_card(path)
            for f in (path / "card.json", path / card.weights):
                if f.is_symlink():
                    raise ModelCardError(f"{f.name} in {path.name} is a symbolic link: refused")
            check_weights(path, card)  # wrong or corrupt weights are refused now, not at activation
            if card.adapter_of is not None:
                read_card(adapter_base_folder(path, card))  # its new model must be here (and a valid version)
            self.gallery.register_version(VersionInfo(
                version=card.version, space=card.space, embedding_dim=card.embedding_dim,
                compatible_with=card.compatible_with, card=card.model_dump(mode="json"),
            ))
            entry.card = card
        except (ModelCardError, GalleryError) as e:
            entry.error = str(e)
        return entry

    def scan(self) -> list[ModelEntry]:
        """(Re)read every folder of the models dir; valid versions are registered in the gallery."""
        with self._lock:
            found: dict[str, ModelEntry] = {}
            if self.models_dir.is_dir():
                for path in sorted(self.models_dir.iterdir()):
                    if path.name.startswith("."):
                        continue
                    if path.is_dir() or path.is_symlink():
                        known = self._entries.get(path.name)
                        found[path.name] = known if (known and known.card and not known.error) else self._read(path)
            self._entries = found
            bad = [e for e in found.values() if e.error]
            for e in bad:
                log.warning("model folder %s refused: %s", e.path, e.error)
            return list(found.values())

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def entry(self, version: str) -> ModelEntry:
        """The entry of ``version``, reading its folder if it is new (so a copied-in model can be activated)."""
        e = self._entries.get(version)
        if e is None or e.error:
            path = self.models_dir / version
            if "/" in version or version in ("", ".", "..") or not (path.is_dir() or path.is_symlink()):
                raise ModelNotFound(f"no model version {version!r} in the models dir {self.models_dir}")
            with self._lock:
                e = self._read(path)
                self._entries[version] = e
        if e.error:
            raise InvalidModel(f"model version {version!r} is refused: {e.error}")
        return e

    # ------------------------------------------------------------------ serving
    @property
    def active(self) -> ActiveModel | None:
        return self._active

    def serving(self):
        """Context for a request that writes embeddings with the active model (ingest)."""
        return self._swap.read()

    def require_active(self) -> ActiveModel:
        active = self._active
        if active is None:
            raise NoActiveModel("no model is active: activate one with POST /v1/models/{version}/activate")
        return active

    def gallery_space_problem(self, card: ModelCard) -> str | None:
        """Why ``card``'s model may not serve over the current gallery, or None if it may.

        It may when every stored item has an embedding in the model's space (trivially so for an empty
        gallery, or a BCT child of the gallery's model).
        """
        total, in_space = self.gallery.live_counts(card.space)  # O(1): activation must not scale with the gallery
        if total == 0 or in_space == total:
            return None
        spaces = {s: n for s, n in self.gallery.counts_by_space().items() if n}
        where = ", ".join(f"{n} in space {s!r}" for s, n in sorted(spaces.items()))
        return (
            f"model {card.version} writes embeddings into space {card.space!r}, but the gallery's {total} items "
            f"are embedded in another space ({where}): its queries would be compared with incompatible "
            f"embeddings. Train it with BCT against the gallery's model, or re-embed the gallery first "
            f"(cost: {backfill_report_url(card.version)})"
        )

    def _load_and_warm(self, entry: ModelEntry) -> tuple[LoadedModel, int]:
        try:
            loaded = load_model(entry.path)
        except ModelCardError as e:
            raise InvalidModel(f"model version {entry.version!r} is refused: {e}") from None
        prep = loaded.preprocess
        # Warm-up: the first forward allocates buffers and picks kernels; do it before taking traffic.
        warm = np.zeros((8, prep.channels, prep.size, prep.size), dtype=np.uint8)
        embed_images(loaded, warm)
        return loaded, len(warm)

    def activate(self, version: str, *, rollback: bool = False) -> ActivationResult:
        """Load, warm, check and swap to ``version``. Raises IncompatibleModel (nothing changes) if refused."""
        t0 = time.perf_counter()
        entry = self.entry(version)
        assert entry.card is not None
        problem = self.gallery_space_problem(entry.card)
        if problem:
            raise IncompatibleModel(problem, candidate=version)
        loaded, warm = self._load_and_warm(entry)
        with self._lock, self._swap.write():
            # Re-check under the lock: an ingest may have landed meanwhile (cheap; counts only).
            problem = self.gallery_space_problem(entry.card)
            if problem:
                raise IncompatibleModel(problem, candidate=version)
            previous = self._active.version if self._active else None
            self.gallery.set_active_version(version, rollback=rollback)
            self._active = ActiveModel(version=version, space=entry.card.space, loaded=loaded, activated_at=time.time())
        seconds = time.perf_counter() - t0
        log.info("activated %s (previous %s) in %.3fs", version, previous, seconds)
        return ActivationResult(version=version, previous=previous, space=entry.card.space, seconds=seconds,
                                warm_images=warm)

    def rollback(self) -> ActivationResult:
        """Re-activate the version active before the current one (same checks as an activation)."""
        history = self.gallery.activation_history()
        if len(history) < 2:
            raise NothingToRollBack("no earlier activation to roll back to")
        return self.activate(history[-2], rollback=True)

    def restore(self, default: str | None) -> ActivationResult | None:
        """At start-up: re-activate the persisted version, else ``default``; None if neither is set."""
        version = self.gallery.active_version() or default
        if version is None:
            return None
        return self.activate(version)
