"""Bridges from core's async iterators to HTTP bodies, with cleanup on disconnect."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import anyio

T = TypeVar("T")


async def aclose_quietly(it: AsyncIterator[Any]) -> None:
    """Close a core iterator even while being cancelled (client disconnect), so it cleans up."""
    aclose = getattr(it, "aclose", None)
    if aclose is None:
        return
    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
        await aclose()


async def encode_stream(it: AsyncIterator[T], encode: Callable[[T], bytes]) -> AsyncIterator[bytes]:
    """Yield encode(item) per item, one body message each (no buffering)."""
    try:
        async for item in it:
            yield encode(item)
    finally:
        await aclose_quietly(it)


async def with_keepalive(
    it: AsyncIterator[T], interval: float, encode: Callable[[T], bytes], keepalive: bytes, preamble: bytes = b""
) -> AsyncIterator[bytes]:
    """Like encode_stream, plus `keepalive` after `interval` seconds of silence.

    The pending __anext__ stays one task across waits: cancelling it on a timeout
    would finish the generator. The first read is started before the preamble is
    sent, so the subscription exists by the time the client sees any byte.
    """
    pending: asyncio.Future[T] | None = asyncio.ensure_future(anext(it))
    try:
        if preamble:
            yield preamble
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(it))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield keepalive
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                pending = None
                return
            pending = None
            yield encode(item)
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with anyio.CancelScope(shield=True), contextlib.suppress(BaseException):
                await pending
        await aclose_quietly(it)
