"""GET /events: Server-Sent Events with `id:` lines and Last-Event-ID replay."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from stacyvm_server.core.models import Caller, Event
from stacyvm_server.errors import BadRequest
from stacyvm_server.http.auth import get_caller
from stacyvm_server.http.deps import get_core
from stacyvm_server.http.streaming import with_keepalive
from stacyvm_server.http.wire import json_value, rfc3339_nano

router = APIRouter(tags=["events"])

KEEPALIVE_SECONDS = 15.0


def event_json(ev: Event) -> dict[str, object]:
    out: dict[str, object] = {"id": f"evt-{ev.seq}", "type": ev.type}
    if ev.sandbox_id:
        out["sandbox_id"] = ev.sandbox_id
    out["timestamp"] = rfc3339_nano(ev.timestamp)
    if ev.data:
        out["data"] = json_value(ev.data)
    return out


def sse_frame(ev: Event) -> bytes:
    return f"id: {ev.seq}\ndata: {json.dumps(event_json(ev))}\n\n".encode()


def _last_event_id(raw: str | None) -> int | None:
    if raw is None or not raw.strip():
        return None
    text = raw.strip()
    if text.startswith("evt-"):
        text = text[4:]
    if not text.isdigit():
        raise BadRequest("Last-Event-ID: must be an event number")
    return int(text)


@router.get("/events", response_model=None)
async def events(request: Request, _: Caller = Depends(get_caller)) -> StreamingResponse:
    last = _last_event_id(request.headers.get("last-event-id"))
    it = get_core(request).events.subscribe(last)
    body = with_keepalive(it, KEEPALIVE_SECONDS, sse_frame, b": keep-alive\n\n", preamble=b": connected\n\n")
    return StreamingResponse(
        body,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "Connection": "keep-alive", "X-Accel-Buffering": "no"},
    )
