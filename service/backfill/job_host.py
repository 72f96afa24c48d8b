"""What a job body uses of the runner that runs it (:class:`~service.backfill.runner.BackfillRunner`).

A protocol, not the class: the runner imports the job bodies (the Ray engine, the transform job), so they may
not import it back. Each body's own protocol adds what only it uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np

    from index.backfill import BackfillJobInfo
    from service.backfill.progress import JobProgress


class JobHost(Protocol):
    """The job's status, progress, end and writes, each in the runner's lease-fenced transactions."""

    def _status(self, job_id: int) -> BackfillJobInfo | None: ...

    def _save_progress(self, job_id: int, done: int, total: int) -> None: ...

    def _finish(self, job_id: int, status: str, done: int, total: int, error: str | None = None) -> None: ...

    def _complete(self, job: BackfillJobInfo, live: JobProgress) -> None: ...

    def _account(
        self, job: BackfillJobInfo, live: JobProgress, done: int, n_ok: int, n_skip: int, saved_at: float
    ) -> tuple[int, int, float]: ...

    def _write(
        self,
        job_id: int,
        candidate: str,
        pairs: list[tuple[str, np.ndarray]],
        skips: list[tuple[int, str]],
        live: JobProgress,
    ) -> tuple[int, int]: ...
