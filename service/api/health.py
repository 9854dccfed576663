"""Liveness, readiness (open: probes carry no key) and the Prometheus scrape endpoint (a `metrics` or `admin`
key when auth is on; a key limited to some adapters sees only their series)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from service import auth
from service.errors import APIError, error_responses

router = APIRouter(tags=["health"])


@router.get("/health", summary="Process is alive")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", summary="Bases loaded and not draining")
async def ready(request: Request) -> dict:
    ctx = request.app.state.ctx
    if ctx.draining:
        raise APIError(503, "draining: shutting down", code="draining")
    if not ctx.ready:
        raise APIError(503, "starting: base models are loading", code="not_ready")
    return {"status": "ready", "tasks": sorted(ctx.engines)}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            dependencies=[Depends(auth.require_metrics)], responses=error_responses(401, 403))
async def metrics(request: Request) -> Response:
    ctx = request.app.state.ctx
    ctx.update_engine_gauges()
    visible = auth.adapter_filter(request)
    body, content_type = ctx.metrics.exposition(request.headers.get("accept"), visible=visible)
    return Response(body, media_type=content_type)
