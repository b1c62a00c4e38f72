"""The bounded output ring behind background process logs (core/ring.py)."""

from __future__ import annotations

import asyncio

import pytest

from stacyvm_server.core.ring import OutputRing


def _text(ring: OutputRing, offset: int = 0, n: int = 10**9) -> tuple[int, bytes]:
    s = ring.read(offset, n)
    return s.dropped, b"".join(d for _, d in s.chunks)


def test_keeps_everything_below_capacity() -> None:
    r = OutputRing(100)
    r.append("stdout", b"hello ")
    r.append("stderr", b"err ")
    r.append("stdout", b"world")
    assert _text(r) == (0, b"hello err world")
    s = r.read(0, 100)
    assert s.chunks == [("stdout", b"hello "), ("stderr", b"err "), ("stdout", b"world")]
    assert (r.start, r.end) == (0, 15)
    assert _text(r, 6) == (0, b"err world")
    assert _text(r, 8) == (0, b"r world")


def test_drops_oldest_bytes_and_reports_them() -> None:
    r = OutputRing(10)
    for i in range(10):
        r.append("stdout", str(i).encode() * 3)  # 30 bytes in all
    assert (r.start, r.end, r.size) == (20, 30, 10)
    assert _text(r) == (20, b"6777888999")
    assert _text(r, 25) == (0, b"888999"[1:])
    assert _text(r, 30) == (0, b"")


def test_huge_write_keeps_its_tail() -> None:
    r = OutputRing(8)
    r.append("stdout", b"ab")
    r.append("stdout", b"0123456789abcdef")
    assert _text(r) == (10, b"89abcdef")
    assert r.end == 18


def test_read_limit_and_continuation() -> None:
    r = OutputRing(1000)
    for _ in range(50):
        r.append("stdout", b"x" * 7)
    got, off = b"", 0
    while off < r.end:
        s = r.read(off, 16)
        assert sum(len(d) for _, d in s.chunks) <= 16
        got += b"".join(d for _, d in s.chunks)
        off = s.next_offset
    assert got == b"x" * 350


def test_many_small_writes_stay_cheap() -> None:
    r = OutputRing(1024)
    for i in range(100_000):
        r.append("stdout", b"%d\n" % i)
    assert r.size == 1024
    assert len(r._chunks) - r._head < 10  # merged, and compacted
    assert _text(r)[1].endswith(b"99999\n")


@pytest.mark.asyncio
async def test_wait_beyond_wakes_on_append_and_close() -> None:
    r = OutputRing(100)
    waiter = asyncio.ensure_future(r.wait_beyond(0))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    r.append("stdout", b"x")
    await asyncio.wait_for(waiter, 1)
    waiter = asyncio.ensure_future(r.wait_beyond(1))
    await asyncio.sleep(0.01)
    r.close()
    await asyncio.wait_for(waiter, 1)
