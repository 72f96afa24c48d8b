"""What a backfill runner knows of a job beyond its SQL row: phase, items/s over a sliding window, seconds
per stage (lost on restart, which is fine)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

RATE_WINDOW_S = 10.0


@dataclass
class JobProgress:
    """What this process knows of a job beyond its SQL row (lost on restart, which is fine)."""

    phase: str | None = None
    reembedded: int = 0
    active_seconds: float = 0.0
    ordering_seconds: float | None = None
    window: deque[tuple[float, int]] = field(default_factory=deque)  # (monotonic time, items handled)
    done: int | None = None  # newer than the job row, which is written at most every PROGRESS_EVERY_S
    total: int | None = None
    stages: dict[str, float] = field(default_factory=dict)  # seconds spent per stage of a batch

    def timed(self, stage: str, t0: float) -> float:
        """Add the time since ``t0`` to ``stage``; returns now."""
        now = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + now - t0
        return now

    def tick(self, handled: int) -> None:
        now = time.monotonic()
        last = self.window[-1][1] if self.window else 0
        self.window.append((now, last + handled))
        while len(self.window) > 2 and now - self.window[0][0] > RATE_WINDOW_S:
            self.window.popleft()

    def rate(self) -> float | None:
        if len(self.window) < 2:
            return None
        (t0, n0), (t1, n1) = self.window[0], self.window[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None
