"""What a rollback across embedding spaces needs, said plainly.

A rollback re-activates the previous version, with the same check as any activation: every stored item
must have an embedding in its space. After a swap to another space (possible once a backfill embedded the
whole gallery there), items ingested from then on are embedded by the new model only, so the previous
space is no longer complete and the rollback is refused (409) until those items are re-embedded with the
previous version: ``POST /v1/backfill`` with it as candidate, then the rollback. The activation response
says so up front (:func:`rollback_note`), and the refusal names the missing items and that route
(:func:`rollback_refusal`).
"""

from __future__ import annotations

import json

from index import Gallery
from index.errors import GalleryError
from service.errors import IncompatibleModel
from service.models.hot_swap import backfill_report_url

_EXAMPLES = 5
_PAGES = 5  # pages of pending items looked through for examples (an item may sit in the space by a BCT child)
_PAGE = 200


def backfill_body(version: str) -> str:
    return json.dumps({"candidate": version})


def rollback_note(gallery: Gallery, version: str, previous: str | None) -> tuple[str, str] | None:
    """``(note, backfill report URL)`` when activating ``version`` over ``previous`` changed the space (so a
    rollback will need a backfill once items arrive), else None."""
    if previous is None or previous == version:
        return None
    try:
        old, new = gallery.get_version(previous).space, gallery.get_version(version).space
    except GalleryError:
        return None
    if old == new:
        return None
    note = (
        f"{version} writes into space {new!r}, {previous} into {old!r}. A rollback to {previous} works while "
        f"every item also has an embedding in {old!r}: items ingested from now on get one in {new!r} only, so "
        f"rolling back will first need them re-embedded with {previous}: POST /v1/backfill "
        f"{backfill_body(previous)} (what it costs: the backfill report), then POST /v1/models/rollback"
    )
    return note, backfill_report_url(previous)


def missing_from_space(gallery: Gallery, version: str) -> tuple[int, int, list[str]]:
    """``(missing, total, examples)``: how many of the gallery's ``total`` items have no embedding in
    ``version``'s space, and the external ids of a few of them (the oldest found)."""
    info = gallery.get_version(version)
    total, in_space = gallery.live_counts(info.space)
    examples: list[str] = []
    after = 0
    for _ in range(_PAGES):
        rows = gallery.backfill.pending(
            version, _PAGE, after
        )  # not embedded by ``version`` (maybe by a child)
        if not rows:
            break
        after = rows[-1][0]
        have, _, _ = gallery.embeddings_of([i for i, _, _ in rows], info.space)
        present = {int(i) for i in have}
        examples += [e for i, e, _ in rows if i not in present][: _EXAMPLES - len(examples)]
        if len(examples) >= _EXAMPLES:
            break
    return total - in_space, total, examples


def rollback_refusal(gallery: Gallery, refused: IncompatibleModel) -> IncompatibleModel:
    """The refusal of a rollback to ``refused.candidate``, saying which items its space lacks and how to
    bring them in (a backfill with that version), instead of the activation's generic wording."""
    target = refused.candidate
    if target is None:
        return refused
    try:
        missing, total, examples = missing_from_space(gallery, target)
    except GalleryError:
        return refused
    if missing <= 0:
        return refused
    named = ", ".join(repr(e) for e in examples)
    return IncompatibleModel(
        f"cannot roll back to {target}: {missing} of the gallery's {total} items have no embedding in its space "
        f"{gallery.get_version(target).space!r}"
        + (f" (e.g. {named})" if named else "")
        + f", ingested after "
        f"{target} stopped serving. Re-embed them with {target} first: POST /v1/backfill {backfill_body(target)} "
        f"(cost: {backfill_report_url(target)}), wait for the job to be done, then roll back",
        candidate=target,
    )
