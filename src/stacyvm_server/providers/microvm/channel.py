"""Host side of the agent protocol: one unix-socket connection per VM, many channels.

QEMU exposes the guest's virtio-serial port as a unix socket (`-chardev socket`).
`AgentConnection` reads frames in one task and routes them to `Channel`s by id.
Flow control is the protocol's credit window in both directions: the guest never
has more than WINDOW unacknowledged bytes in flight per channel, and we
acknowledge only what our consumer has taken, so a slow HTTP client stops the
guest process instead of growing a buffer here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable
from typing import Any

from stacyvm_server.errors import ProviderError
from stacyvm_server.providers.microvm import protocol as P

MAX_QUEUED = 4096  # events one channel may hold unread (each DATA is at most 64 KiB + EOFs)
Event = tuple[str, Any]  # ("data", (stream, bytes)) | ("msg", dict)


class AgentGone(ProviderError):
    """The VM's agent connection ended (VM stopped or crashed)."""


class Channel:
    def __init__(self, conn: AgentConnection, chan: int) -> None:
        self.conn, self.id = conn, chan
        self.events: asyncio.Queue[Event | None] = asyncio.Queue()
        self.credit = P.WINDOW  # what we may still send
        self.unacked = 0  # what the guest sent that our consumer has not taken yet
        self._credit_changed = asyncio.Event()
        self.failed: BaseException | None = None

    # inbound ------------------------------------------------------------------------
    async def next(self) -> Event:
        ev = await self.events.get()
        if ev is None:
            raise self.failed or AgentGone("the microVM agent connection closed")
        return ev

    async def opened(self, ev: str, timeout: float, failure: Callable[[str], Exception]) -> None:
        """Wait for the guest's `ev` answer to this channel's request; on an error or a
        timeout close the channel and raise failure(why)."""
        try:
            kind, m = await asyncio.wait_for(self.next(), timeout)
        except TimeoutError:
            self.close()
            raise failure(f"no answer from the guest agent within {timeout:.0f} s") from None
        if kind == "msg" and m.get("ev") == ev:
            return
        self.close()
        raise failure(str(m.get("message") or m) if kind == "msg" else "unexpected data")

    def consumed(self, n: int) -> None:
        """Return credit for n DATA bytes the consumer has taken."""
        if n:
            self.unacked -= n
            self.conn.write(P.ack(self.id, n))

    # outbound --------------------------------------------------------------------------
    def send_msg(self, obj: dict[str, Any]) -> None:
        self.conn.write(P.msg(self.id, obj))

    async def send_data(self, data: bytes, stream: int = P.IN) -> None:
        """Send bytes (chunked, within the window); b"" sends EOF."""
        if not data:
            self.conn.write(P.data(self.id, stream, b""))
            return
        view = memoryview(data)
        while view:
            while self.credit <= 0:
                if self.failed is not None:
                    raise self.failed
                self._credit_changed.clear()
                await self._credit_changed.wait()
            n = min(len(view), P.CHUNK, self.credit)
            self.credit -= n
            self.conn.write(P.data(self.id, stream, bytes(view[:n])))
            view = view[n:]
        await self.conn.drain()

    def _acked(self, n: int) -> None:
        self.credit += n
        self._credit_changed.set()

    def _fail(self, exc: BaseException) -> None:
        self.failed = exc
        self._credit_changed.set()
        self.events.put_nowait(None)

    def close(self) -> None:
        self.conn.channels.pop(self.id, None)


class AgentConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.channels: dict[int, Channel] = {}
        self._ids = itertools.count(1)
        self.closed = False
        self._task = asyncio.create_task(self._read_loop())

    @classmethod
    async def open(cls, path: str, timeout: float) -> AgentConnection:
        """Connect to QEMU's agent socket, retrying while QEMU is still starting."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
                return cls(reader, writer)
            except (FileNotFoundError, ConnectionRefusedError):
                if loop.time() > deadline:
                    raise ProviderError(f"no agent socket at {path} after {timeout:.0f} s") from None
                await asyncio.sleep(0.01)

    def channel(self, op: str, **args: Any) -> Channel:
        if self.closed:
            raise AgentGone("the microVM agent connection is closed")
        ch = Channel(self, next(self._ids))
        self.channels[ch.id] = ch
        ch.send_msg({"op": op, **args})
        return ch

    async def request(self, op: str, timeout: float = 30, **args: Any) -> dict[str, Any]:
        """A one-shot operation: its "done" payload, or OSError(errno) from the guest."""
        ch = self.channel(op, **args)
        try:
            kind, m = await asyncio.wait_for(ch.next(), timeout)
        except TimeoutError:
            raise ProviderError(f"the microVM agent did not answer {op!r} within {timeout:.0f} s") from None
        finally:
            ch.close()
        if kind != "msg":
            raise ProviderError(f"unexpected agent reply to {op!r}")
        raise_for_error(m)
        return dict(m)

    def write(self, frame: bytes) -> None:
        if not self.closed:
            self.writer.write(frame)

    async def drain(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    async def _read_loop(self) -> None:
        parser = P.Parser()
        error: BaseException = AgentGone("the microVM agent connection closed")
        try:
            while chunk := await self.reader.read(1 << 18):
                for chan, kind, payload in parser.feed(chunk):
                    ch = self.channels.get(chan)
                    if ch is None:
                        continue
                    if kind == P.ACK:
                        ch._acked(P.decode_ack(payload))
                        continue
                    # The guest is untrusted: it must respect our window, or it could
                    # make us buffer without bound.
                    if kind == P.DATA:
                        ch.unacked += len(payload) - 1
                    if ch.unacked > P.WINDOW or ch.events.qsize() > MAX_QUEUED:
                        raise P.ProtocolError(f"channel {chan} overran its window")
                    if kind == P.MSG:
                        ch.events.put_nowait(("msg", P.decode_msg(payload)))
                    else:
                        ch.events.put_nowait(("data", (payload[0], payload[1:])))
        except (P.ProtocolError, ValueError) as exc:  # a guest speaking garbage is cut off
            error = AgentGone(f"the microVM agent broke the protocol: {exc}")
        except ConnectionError:
            pass
        finally:
            self.closed = True
            for ch in list(self.channels.values()):
                ch._fail(error)
            self.writer.close()

    async def close(self) -> None:
        self.closed = True
        self.writer.close()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await self._task


class GuestOSError(OSError):
    pass


def raise_for_error(m: dict[str, Any]) -> None:
    if m.get("ev") == "error":
        raise GuestOSError(int(m.get("errno") or 0), str(m.get("message") or "error in the guest"))
