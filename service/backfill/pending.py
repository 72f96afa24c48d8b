"""Walking a backfill job's pending items (not yet embedded by its candidate), in its stored order or by id."""

from __future__ import annotations

from index import Gallery


class PendingCursor:
    """Walks a job's pending items: its stored order first (if any), then every item by id (items added
    since the order was made, or re-pended behind the cursor), until a full pass by id finds nothing.

    Starting a scan from the beginning (order -> ids, or a new pass) would list the items of a batch still
    in flight as pending, so it is allowed only when nothing is in flight (``rewind_ok``)."""

    def __init__(self, gallery: Gallery, job_id: int, candidate: str, ordered: bool) -> None:
        self.gallery, self.job_id, self.candidate = gallery, job_id, candidate
        self.phase = "order" if ordered else "ids"
        self.position, self.after = -1, 0

    def next(self, limit: int, rewind_ok: bool = True) -> list[tuple[int, str, str | None]] | None:
        """Up to ``limit`` pending items ``(item_id, external_id, source_uri)``; [] when none is left;
        None when a rewind is needed and not allowed (ask again once the batch in flight is stored)."""
        while True:
            if self.phase == "order":
                rows = self.gallery.backfill.pending_ordered(
                    self.job_id, self.candidate, limit, self.position
                )
                if rows:
                    self.position = rows[-1][0]
                    return [(i, e, u) for _, i, e, u in rows]
                if not rewind_ok:
                    return None
                self.phase = "ids"
                continue
            got = self.gallery.backfill.pending(self.candidate, limit, self.after, job_id=self.job_id)
            if got:
                self.after = got[-1][0]
                return got
            if self.after == 0:
                return []
            if not rewind_ok:
                return None
            self.after = 0
