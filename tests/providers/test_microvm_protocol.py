"""The host side of the agent protocol against a hostile guest (a socket we script):
a guest that ignores flow control or speaks garbage is cut off, never buffered."""

from __future__ import annotations

import asyncio
import socket

import pytest

from stacyvm_server.providers.microvm import protocol as P
from stacyvm_server.providers.microvm.channel import AgentConnection, AgentGone

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _pair() -> tuple[AgentConnection, socket.socket]:
    host, guest = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=host)
    guest.setblocking(False)
    return AgentConnection(reader, writer), guest


async def _send(guest: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(guest, data)


async def test_window_overrun_cuts_the_guest_off() -> None:
    conn, guest = await _pair()
    ch = conn.channel("read", path="/big")
    chunk = b"x" * P.CHUNK
    for _ in range(P.WINDOW // P.CHUNK):  # exactly the window: accepted
        await _send(guest, P.data(ch.id, P.OUT, chunk))
    first = await asyncio.wait_for(ch.next(), 5)
    assert first == ("data", (P.OUT, chunk))
    await _send(guest, P.data(ch.id, P.OUT, chunk * 2))  # beyond what we acknowledged
    with pytest.raises(AgentGone, match="overran its window"):
        while True:
            await asyncio.wait_for(ch.next(), 5)
    assert conn.closed
    guest.close()


async def test_consumed_data_returns_credit() -> None:
    conn, guest = await _pair()
    ch = conn.channel("read", path="/big")
    chunk = b"y" * P.CHUNK
    for _ in range(3 * P.WINDOW // P.CHUNK):  # three windows, acknowledged as we go
        await _send(guest, P.data(ch.id, P.OUT, chunk))
        _kind, (_, got) = await asyncio.wait_for(ch.next(), 5)
        ch.consumed(len(got))
    assert not conn.closed and ch.unacked == 0
    await conn.close()
    guest.close()


async def test_garbage_frame_cuts_the_guest_off() -> None:
    conn, guest = await _pair()
    ch = conn.channel("ping")
    await _send(guest, P.HEADER.pack(ch.id, 99, 4) + b"junk")
    with pytest.raises(AgentGone, match="broke the protocol"):
        await asyncio.wait_for(ch.next(), 5)
    guest.close()


async def test_request_error_is_an_oserror_with_the_guest_errno() -> None:
    conn, guest = await _pair()
    task = asyncio.create_task(conn.request("stat", path="/nope"))
    frames = P.Parser()
    while not (got := frames.feed(await asyncio.get_running_loop().sock_recv(guest, 4096))):
        pass
    chan, kind, payload = got[0]
    assert kind == P.MSG and P.decode_msg(payload) == {"op": "stat", "path": "/nope"}
    await _send(guest, P.msg(chan, {"ev": "error", "errno": 2, "message": "No such file or directory"}))
    with pytest.raises(OSError) as info:
        await task
    assert info.value.errno == 2
    await conn.close()
    guest.close()
