"""The hot paths' micro-batchers (search by image, ingest), built from settings and tied to one app's state."""

from __future__ import annotations

from collections.abc import Callable

from service.batching import MicroBatcher
from service.ingest_pipeline import IngestRunner
from service.search_pipeline import SearchJob, run_search_batch
from service.state import AppState


def start_hot_paths(state: AppState) -> Callable[[], None]:
    """Start the search and ingest batchers on ``state``; returns the function that stops them (it lets
    queued work finish)."""
    s = state.settings

    def worker_start() -> None:
        # FAISS's OpenMP thread count is per calling thread: setting it once at start-up in the main
        # thread (Gallery.open) does not reach the threads that search.
        if s.faiss_threads:
            import faiss

            faiss.omp_set_num_threads(int(s.faiss_threads))

    def search_batch(active, jobs: list[SearchJob]):
        return run_search_batch(state.gallery, active, jobs, state.metrics)

    ingest = IngestRunner(state)
    state.search_batcher = MicroBatcher(
        "search", search_batch, max_size=s.batch_max_size, max_wait_s=s.batch_max_wait_ms / 1e3,
        max_queue=s.batch_max_queue, on_start=worker_start,
        on_batch=state.metrics.batch_size.labels(queue="search").observe,
    ).start()
    state.ingest_batcher = MicroBatcher(
        "ingest", ingest, max_size=s.ingest_batch_max_items, max_wait_s=s.batch_max_wait_ms / 1e3,
        max_queue=s.batch_max_queue, on_start=worker_start, size_of=len,
        on_batch=state.metrics.batch_size.labels(queue="ingest").observe,
    ).start()

    def stop() -> None:
        for b in (state.search_batcher, state.ingest_batcher):
            if b is not None:
                b.close()
        ingest.close()

    return stop
