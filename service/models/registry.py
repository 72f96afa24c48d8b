"""The model versions on disk: which folders of the models dir are valid versions, and why the others are not.

Every valid folder is registered in the gallery's catalog (at start-up, and when a write names it: an
activation, a backfill); invalid ones are listed with the reason and never loaded. Reading a folder verifies
its card and weights (:func:`trainer.verify_weights`) without loading them. An adapter version (card with
``adapter_of``) is "the new model it names, then the adapter": valid only while that model's folder sits
next to it. Reads (``survey``, ``known``) never write to the catalog; ``scan`` and ``entry`` do.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from index import Gallery, VersionInfo
from index.errors import GalleryError
from service.errors import InvalidModel, ModelNotFound
from trainer import ModelCard, ModelCardError, adapter_base_folder, read_card, verify_weights

log = logging.getLogger(__name__)


@dataclass
class ModelEntry:
    """A folder of the models dir: its card if valid, else why it was refused."""

    version: str
    path: Path
    card: ModelCard | None = None
    error: str | None = None


def _plausible(version: str) -> bool:
    """Whether ``version`` can name a folder of the models dir at all (no path, not too long for a file name)."""
    return (
        1 <= len(version) <= 128 and "/" not in version and "\0" not in version and version not in (".", "..")
    )


def _is_folder(path: Path) -> bool:
    try:
        return path.is_dir() or path.is_symlink()
    except (OSError, ValueError):  # a name the file system refuses
        return False


class ModelRegistry:
    """Model versions on disk. Thread-safe."""

    def __init__(self, models_dir: Path, gallery: Gallery) -> None:
        self.models_dir = Path(models_dir)
        self.gallery = gallery
        self._entries: dict[str, ModelEntry] = {}
        self._registered: set[str] = set()
        self._lock = threading.Lock()

    def public(self, message: str) -> str:
        """``message`` without the models dir's location: a client learns folder names, not where they live
        (trainer's errors name whole paths)."""
        roots = {str(self.models_dir.resolve()), str(self.models_dir.absolute())}
        for root in sorted(roots, key=len, reverse=True):
            message = message.replace(root + os.sep, "").replace(root, "the models dir")
        if not self.models_dir.is_absolute() and str(self.models_dir) not in ("", "."):
            message = message.replace(str(self.models_dir) + os.sep, "")
        return message

    def _inside_models_dir(self, path: Path) -> bool:
        root = self.models_dir.resolve()
        try:
            resolved = path.resolve(strict=True)
        except OSError:
            return False
        return resolved.parent == root and not path.is_symlink()

    def _read(self, path: Path) -> ModelEntry:
        """Verify one folder (card, weights, an adapter's base model); nothing is loaded or written."""
        entry = ModelEntry(version=path.name, path=path)
        if not self._inside_models_dir(path):
            # the folder name only: the absolute models dir is not the client's business
            entry.error = f"{path.name} is a link or lies outside the models dir: refused"
            return entry
        try:
            card = read_card(path)
            for f in (path / "card.json", path / card.weights):
                if f.is_symlink():
                    raise ModelCardError(f"{f.name} in {path.name} is a symbolic link: refused")
            verify_weights(path, card)  # wrong or corrupt weights are refused now, not at activation
            if card.adapter_of is not None:
                read_card(adapter_base_folder(path, card))  # its new model must be here (and a valid version)
            entry.card = card
        except ModelCardError as e:
            entry.error = self.public(str(e))
        return entry

    def _register(self, entry: ModelEntry) -> ModelEntry:
        """Write a valid entry's version into the gallery's catalog (once per process)."""
        card = entry.card
        if card is None or entry.version in self._registered:
            return entry
        try:
            self.gallery.register_version(
                VersionInfo(
                    version=card.version,
                    space=card.space,
                    embedding_dim=card.embedding_dim,
                    compatible_with=card.compatible_with,
                    card=card.model_dump(mode="json"),
                )
            )
            self._registered.add(entry.version)
        except GalleryError as e:
            entry.card, entry.error = None, self.public(str(e))
        return entry

    def _folders(self) -> list[Path]:
        if not self.models_dir.is_dir():
            return []
        return [
            p
            for p in sorted(self.models_dir.iterdir())
            if not p.name.startswith(".") and (p.is_dir() or p.is_symlink())
        ]

    def survey(self) -> list[ModelEntry]:
        """Every folder of the models dir, verified (new folders are read once); writes nothing."""
        with self._lock:
            found: dict[str, ModelEntry] = {}
            for path in self._folders():
                known = self._entries.get(path.name)
                found[path.name] = known if (known and known.card) else self._read(path)
            self._entries = found
            return list(found.values())

    def scan(self) -> list[ModelEntry]:
        """Read every folder, and register the valid versions in the gallery (start-up)."""
        entries = self.survey()
        with self._lock:
            for e in entries:
                self._register(e)
        for e in entries:
            if e.error:
                log.warning("model folder %s refused: %s", e.path.name, e.error)
        return entries

    def known(self, version: str) -> ModelEntry | None:
        """The entry of ``version`` as last read, without touching the disk (None if never read)."""
        return self._entries.get(version)

    def entry(self, version: str) -> ModelEntry:
        """The valid, registered entry of ``version``, reading its folder if it is new or was refused (so a
        copied-in model can be activated). Raises :class:`ModelNotFound` or :class:`InvalidModel`."""
        e = self._entries.get(version)
        if e is None or e.error:
            path = self.models_dir / version
            if not _plausible(version) or not _is_folder(path):
                raise ModelNotFound(f"no model version {version[:128]!r} in the models dir")
            e = self._read(path)
            with self._lock:
                self._entries[version] = e
        if e.card is not None:
            with self._lock:
                self._register(e)
        if e.error:
            raise InvalidModel(f"model version {version!r} is refused: {e.error}")
        return e
