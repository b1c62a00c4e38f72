"""Health, liveness, readiness and metrics (contract §12)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from stacyvm_server.core.models import Caller
from stacyvm_server.durations import format_go_duration
from stacyvm_server.http.auth import get_caller
from stacyvm_server.http.deps import get_core, ok
from stacyvm_server.http.wire import json_value, provider_json

router = APIRouter(tags=["system"])


def _basics(request: Request, status: str) -> dict[str, Any]:
    core = get_core(request)
    return {
        "status": status,
        "version": core.version,
        "uptime": format_go_duration(time.monotonic() - core.started_at),
    }


# /health and /live are open (no key) and say nothing beyond status, version and uptime.
@router.get("/health")
async def health(request: Request) -> JSONResponse:
    return ok(_basics(request, "ok"))


@router.get("/live")
async def live(request: Request) -> JSONResponse:
    return ok(_basics(request, "alive"))


@router.get("/ready")
async def ready(request: Request, _: Caller = Depends(get_caller)) -> JSONResponse:
    infos = sorted(await get_core(request).providers_info(), key=lambda p: p.name)
    healthy = sum(1 for p in infos if p.healthy)
    body = _basics(request, "ready" if healthy else "not_ready")
    body.update(
        {"providers": [provider_json(p) for p in infos], "ready_providers": healthy, "total_providers": len(infos)}
    )
    return ok(body, 200 if healthy else 503)


@router.get("/metrics")
async def metrics(request: Request, _: Caller = Depends(get_caller)) -> JSONResponse:
    body = _basics(request, "ok")
    del body["status"]
    body.update(json_value(get_core(request).metrics.snapshot()))
    return ok(body)


@router.get("/metrics/prometheus")
async def prometheus(request: Request, _: Caller = Depends(get_caller)) -> Response:
    data, content_type = get_core(request).metrics.render_prometheus()
    return Response(content=data, media_type=content_type)
