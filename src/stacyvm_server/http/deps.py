"""Small request helpers shared by the routers: the core handle and the JSON response."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse

if TYPE_CHECKING:
    from stacyvm_server.core.server import Core


def get_core(request: Request) -> Core:
    core: Core = request.app.state.core
    return core


def ok(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status)
