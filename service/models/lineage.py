"""Lineage: the chain of generations a model version descends from, and where the gallery's items come from.

A version's parent is the version it was trained to be compatible with (its card's ``compatible_with``: the
BCT parent, or the old model of an adapter). The lineage of a version is its ancestors, nearest first; its
generation is 1 + their number (a version trained without BCT starts a chain of its own at 1). Parents come
from the cards in the models dir, else from the gallery's record of registered versions (a retired parent's
folder may be gone).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from index import Gallery
from trainer import ModelCard


def parents_of(cards: Iterable[ModelCard], gallery: Gallery | None = None) -> dict[str, str | None]:
    """version -> parent (None: the root of a chain), from ``cards`` and then the gallery's versions."""
    out: dict[str, str | None] = {}
    if gallery is not None:
        out.update({v.version: v.compatible_with for v in gallery.list_versions()})
    out.update({c.version: c.compatible_with for c in cards})
    return out


def lineage(version: str, parents: Mapping[str, str | None]) -> list[str]:
    """Ancestors of ``version``, nearest first (a parent not known anywhere ends the chain where it is)."""
    out: list[str] = []
    seen = {version}
    p = parents.get(version)
    while p is not None and p not in seen:  # a cycle in hand-edited cards must not hang a request
        out.append(p)
        seen.add(p)
        p = parents.get(p)
    return out


def generations_in(gallery: Gallery, space: str, parents: Mapping[str, str | None]) -> dict[str, dict]:
    """The gallery's items of ``space`` per version that made their vectors: ``{version: {"model": n,
    "transform": m, "generation": g, "lineage": [...]}}``."""
    out: dict[str, dict] = {}
    for version, routes in gallery.counts_in_space(space).items():
        line = lineage(version, parents)
        out[version] = {**routes, "generation": len(line) + 1, "lineage": line}
    return out
