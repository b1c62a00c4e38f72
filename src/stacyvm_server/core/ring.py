"""A bounded, append-only output log that many readers follow at their own pace.

Offsets are absolute byte positions since the process started. The ring keeps
only the newest `capacity` bytes; a reader whose offset fell behind `start`
learns how many bytes it missed (`dropped`) and continues from the oldest byte
still kept. Writers never wait for readers, so memory stays bounded no matter
how slow a reader is: slowness costs the reader data, never the server memory.
"""

from __future__ import annotations

import asyncio
import bisect
from dataclasses import dataclass

# Small writes are merged into the previous chunk (same stream) up to this size,
# so a line-by-line writer does not cost a Python object per line.
_MERGE_LIMIT = 16 * 1024


@dataclass(frozen=True)
class Slice:
    offset: int  # where the first returned byte starts
    next_offset: int  # where to continue reading
    dropped: int  # bytes between the requested offset and `offset` that are gone
    chunks: list[tuple[str, bytes]]


class OutputRing:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._offs: list[int] = []
        self._chunks: list[tuple[str, bytes]] = []
        self._head = 0  # index of the oldest live chunk (the list is compacted lazily)
        self.start = 0  # offset of the oldest byte kept
        self.end = 0  # offset after the newest byte
        self.closed = False
        self._event = asyncio.Event()

    @property
    def size(self) -> int:
        return self.end - self.start

    def append(self, stream: str, data: bytes) -> None:
        if not data:
            return
        if len(data) > self.capacity:  # only the tail can ever be read
            skip = len(data) - self.capacity
            self._drop_all()
            self.end += skip
            self.start = self.end
            data = data[skip:]
        last = len(self._chunks) - 1
        if last >= self._head and self._chunks[last][0] == stream and len(self._chunks[last][1]) < _MERGE_LIMIT:
            self._chunks[last] = (stream, self._chunks[last][1] + data)
        else:
            self._offs.append(self.end)
            self._chunks.append((stream, data))
        self.end += len(data)
        self._trim()
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _drop_all(self) -> None:
        self._offs.clear()
        self._chunks.clear()
        self._head = 0
        self.start = self.end

    def _trim(self) -> None:
        while self.end - self.start > self.capacity:
            over = self.end - self.start - self.capacity
            stream, data = self._chunks[self._head]
            if len(data) <= over:
                self._chunks[self._head] = ("", b"")
                self._head += 1
                self.start += len(data)
            else:
                self._chunks[self._head] = (stream, data[over:])
                self._offs[self._head] += over
                self.start += over
        if self._head > 256 and self._head * 2 > len(self._chunks):
            del self._chunks[: self._head]
            del self._offs[: self._head]
            self._head = 0

    def _wake(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    def read(self, offset: int, max_bytes: int) -> Slice:
        """Up to about max_bytes from `offset` (whole chunks, the last one cut)."""
        offset = max(0, min(offset, self.end))
        dropped = 0
        if offset < self.start:
            dropped, offset = self.start - offset, self.start
        out: list[tuple[str, bytes]] = []
        pos = offset
        i = max(self._head, bisect.bisect_right(self._offs, offset, lo=self._head) - 1)
        budget = max_bytes
        while i < len(self._chunks) and budget > 0 and pos < self.end:
            stream, data = self._chunks[i]
            piece = data[pos - self._offs[i] :][:budget]
            if piece:
                out.append((stream, piece))
                pos += len(piece)
                budget -= len(piece)
            i += 1
        return Slice(offset, pos, dropped, out)

    async def wait_beyond(self, offset: int, timeout: float | None = None) -> None:
        """Return once there is data at or after `offset`, the ring is closed, or timeout passed."""
        if self.end > offset or self.closed:
            return
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            pass
