"""The follower: a thread that keeps this replica in step with others writing to the same database.

Every ``interval_s`` it asks the gallery to apply what other processes committed (:meth:`Gallery.follow`:
one query when nothing changed) and compares the persisted active version with the one this process
serves; when another replica activated or rolled back, it loads that version and swaps to it
(:meth:`HotSwap.follow`). So an item acknowledged by any replica is searchable here, and an activation
anywhere is served here, within about one interval plus the time to apply the change.

Polling, not LISTEN/NOTIFY: it works on every database the gallery supports (SQLite files shared by
processes on one machine too), a missed notification cannot leave a replica behind, and at the default
interval the cost is two indexed one-row queries every 0.2 s.
"""

from __future__ import annotations

import logging
import threading
import time

from index import Gallery
from service.models.hot_swap import HotSwap
from service.observability import Metrics

log = logging.getLogger(__name__)


class ReplicaFollower:
    """Polls the database and applies other replicas' changes to this process."""

    def __init__(self, gallery: Gallery, swap: HotSwap, metrics: Metrics, interval_s: float) -> None:
        self.gallery, self.swap, self.metrics = gallery, swap, metrics
        self.interval_s = float(interval_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # a version that would not load here, and when to try it again (doubling, at most a minute: a
        # folder still being copied onto the shared volume loads later)
        self._failed_version: str | None = None
        self._retry_at = 0.0
        self._retry_s = 1.0
        self.polls = 0
        self.last_error: str | None = None

    def start(self) -> None:
        if self.interval_s <= 0:
            log.info("following other replicas is off (follow_interval_s=0)")
            return
        self._thread = threading.Thread(target=self._main, name="replica-follower", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _main(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.step()
                self.last_error = None
            except Exception as e:  # the database briefly unreachable, say: keep following
                if self.last_error is None:
                    log.exception("following other replicas failed; retrying every %.2fs", self.interval_s)
                self.last_error = f"{type(e).__name__}: {e}"
                if self._stop.wait(min(5.0, 10 * self.interval_s)):
                    return

    def step(self) -> None:
        """One poll: other replicas' writes, then their activations."""
        from index.errors import GalleryClosed

        self.polls += 1
        try:
            report = self.gallery.follow()
            persisted = self.gallery.active_version()
        except GalleryClosed:
            self._stop.set()
            return
        if report is not None and (report.added or report.removed or report.new_spaces):
            log.info(
                "followed other replicas: +%d -%d vectors%s in %.3fs",
                report.added,
                report.removed,
                f", new spaces {report.new_spaces}" if report.new_spaces else "",
                report.seconds,
            )
        active = self.swap.active
        if persisted is None or (active is not None and active.version == persisted):
            return
        if persisted == self._failed_version and time.monotonic() < self._retry_at:
            return
        t0 = time.perf_counter()
        try:
            swapped = self.swap.follow(persisted)
        except Exception as e:
            if persisted != self._failed_version:
                self._failed_version, self._retry_s = persisted, 1.0
            log.error(
                "another replica activated %s, but it does not load here (retrying in %.0fs): %s",
                persisted,
                self._retry_s,
                e,
            )
            self._retry_at = time.monotonic() + self._retry_s
            self._retry_s = min(60.0, 2 * self._retry_s)
            return
        self._failed_version = None
        if swapped:
            self.gallery.refresh_versions()
            now = self.swap.active
            if now is not None:
                self.metrics.set_active(now.version, now.space)
            log.info("now serving %s like the other replicas (%.3fs)", persisted, time.perf_counter() - t0)
