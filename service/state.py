"""What the routes share: settings, the gallery, the model registry, item sources, metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from index import Gallery
from service.batching import MicroBatcher
from service.blobs import BlobStore
from service.cost import ThroughputProbe
from service.observability import Metrics
from service.registry import ModelRegistry
from service.settings import Settings

if TYPE_CHECKING:
    from service.backfill_runner import BackfillRunner


@dataclass
class AppState:
    settings: Settings
    gallery: Gallery
    registry: ModelRegistry
    blobs: BlobStore
    probe: ThroughputProbe
    metrics: Metrics
    backfill: BackfillRunner | None = None  # started by the app's lifespan
    # the hot paths' micro-batchers (service.batching), started by the app's lifespan
    search_batcher: MicroBatcher | None = None
    ingest_batcher: MicroBatcher | None = None


def get_state(request: Request) -> AppState:
    return request.app.state.graceful


State = Annotated[AppState, Depends(get_state)]
