"""The parts of one running app, built once by :func:`service.app.create_app`'s lifespan in dependency order.

Frozen and complete: a route never meets a part that is missing or swapped behind its back. Routes receive
single parts through the typed dependencies of :mod:`service.api.deps`, never this whole object.
"""

from __future__ import annotations

from dataclasses import dataclass

from index import Gallery
from service.backfill.cost import CostReport
from service.backfill.runner import BackfillRunner
from service.blobs import BlobStore
from service.models.cache import ModelCache
from service.models.hot_swap import HotSwap
from service.models.registry import ModelRegistry
from service.observability import Metrics
from service.replicas.follower import ReplicaFollower
from service.serving.ingest import IngestPath
from service.serving.search import SearchPath
from service.serving.shadow import ShadowTraffic
from service.settings import Settings


@dataclass(frozen=True)
class Parts:
    settings: Settings
    metrics: Metrics
    gallery: Gallery
    blobs: BlobStore
    registry: ModelRegistry
    models: ModelCache
    swap: HotSwap
    shadow: ShadowTraffic
    search: SearchPath
    ingest: IngestPath
    backfill: BackfillRunner
    costs: CostReport
    follower: ReplicaFollower
