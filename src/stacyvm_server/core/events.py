"""Event bus: bounded in-memory history (persisted), live fan-out to SSE subscribers."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator

from stacyvm_server.core.models import Event, utcnow
from stacyvm_server.store.db import Store

_SUBSCRIBER_BUFFER = 256
# Events reach the store at most this late; a SIGKILL can lose that much history.
_FLUSH_DELAY = 0.2


class EventBus:
    def __init__(self, store: Store, history: int) -> None:
        self._store = store
        self._keep = history
        self._history: collections.deque[Event] = collections.deque(store.recent_events(history), maxlen=history)
        self._seq = self._history[-1].seq if self._history else 0
        self._subscribers: set[asyncio.Queue[Event | None]] = set()
        self._unsaved: list[Event] = []
        self._flush_scheduled = False
        self.total = 0

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    @property
    def history_size(self) -> int:
        return len(self._history)

    def publish(self, type_: str, sandbox_id: str | None = None, data: dict[str, object] | None = None) -> Event:
        self._seq += 1
        ev = Event(self._seq, type_, utcnow(), sandbox_id, data)
        self._history.append(ev)
        self._persist(ev)
        self.total += 1
        for q in list(self._subscribers):
            if q.full():
                # A slow subscriber is cut off (it can reconnect with Last-Event-ID).
                self._subscribers.discard(q)
                q.get_nowait()
                q.put_nowait(None)
            else:
                q.put_nowait(ev)
        return ev

    def _persist(self, ev: Event) -> None:
        """Write events in batches: one commit per burst instead of one per event."""
        self._unsaved.append(ev)
        if self._flush_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._flush_scheduled = True
        loop.call_later(_FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        batch, self._unsaved = self._unsaved, []
        if batch:
            self._store.append_events(batch, self._keep)

    async def subscribe(self, last_event_id: int | None = None) -> AsyncIterator[Event]:
        q: asyncio.Queue[Event | None] = asyncio.Queue(_SUBSCRIBER_BUFFER)
        self._subscribers.add(q)
        try:
            last = self._seq if last_event_id is None else last_event_id
            for ev in list(self._history):
                if ev.seq > last:
                    last = ev.seq
                    yield ev
            while True:
                item = await q.get()
                if item is None:
                    return
                if item.seq > last:
                    last = item.seq
                    yield item
        finally:
            self._subscribers.discard(q)

    def close(self) -> None:
        self.flush()
        for q in list(self._subscribers):
            if q.full():
                q.get_nowait()
            q.put_nowait(None)
        self._subscribers.clear()
