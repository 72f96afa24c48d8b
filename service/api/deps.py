"""One typed dependency per part: a route names the parts it uses in its signature, nothing more."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from index import Gallery
from service.backfill.cost import CostReport
from service.backfill.runner import BackfillRunner
from service.blobs import BlobStore
from service.models.hot_swap import HotSwap
from service.models.registry import ModelRegistry
from service.observability import Metrics
from service.parts import Parts
from service.serving.ingest import IngestPath
from service.serving.search import SearchPath
from service.serving.shadow import ShadowTraffic
from service.settings import Settings


def get_parts(request: Request) -> Parts:
    return request.app.state.parts


def _settings(request: Request) -> Settings:
    return get_parts(request).settings


def _metrics(request: Request) -> Metrics:
    return get_parts(request).metrics


def _gallery(request: Request) -> Gallery:
    return get_parts(request).gallery


def _blobs(request: Request) -> BlobStore:
    return get_parts(request).blobs


def _registry(request: Request) -> ModelRegistry:
    return get_parts(request).registry


def _swap(request: Request) -> HotSwap:
    return get_parts(request).swap


def _search(request: Request) -> SearchPath:
    return get_parts(request).search


def _ingest(request: Request) -> IngestPath:
    return get_parts(request).ingest


def _backfill(request: Request) -> BackfillRunner:
    return get_parts(request).backfill


def _shadow(request: Request) -> ShadowTraffic:
    return get_parts(request).shadow


def _costs(request: Request) -> CostReport:
    return get_parts(request).costs


SettingsDep = Annotated[Settings, Depends(_settings)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
GalleryDep = Annotated[Gallery, Depends(_gallery)]
BlobsDep = Annotated[BlobStore, Depends(_blobs)]
RegistryDep = Annotated[ModelRegistry, Depends(_registry)]
SwapDep = Annotated[HotSwap, Depends(_swap)]
SearchDep = Annotated[SearchPath, Depends(_search)]
IngestDep = Annotated[IngestPath, Depends(_ingest)]
BackfillDep = Annotated[BackfillRunner, Depends(_backfill)]
CostsDep = Annotated[CostReport, Depends(_costs)]
ShadowDep = Annotated[ShadowTraffic, Depends(_shadow)]
