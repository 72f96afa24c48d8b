"""What the routes share: settings, the gallery, the model registry, item sources, metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from index import Gallery
from service.blobs import BlobStore
from service.cost import ThroughputProbe
from service.observability import Metrics
from service.registry import ModelRegistry
from service.settings import Settings


@dataclass
class AppState:
    settings: Settings
    gallery: Gallery
    registry: ModelRegistry
    blobs: BlobStore
    probe: ThroughputProbe
    metrics: Metrics


def get_state(request: Request) -> AppState:
    return request.app.state.graceful


State = Annotated[AppState, Depends(get_state)]
