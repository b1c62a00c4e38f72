"""Wire format between the host and the guest agent (virtio-serial byte stream).

This module is copied into the guest's initramfs and runs there under Debian's
python3.11 with a minimal standard library, so it imports nothing but stdlib
modules that the initramfs carries (struct, json).

A frame is a 9-byte header `!IBI` (channel, kind, length) and `length` bytes.
Every request gets a channel id chosen by the host; all frames for it carry
that id, so many execs, file transfers and preview connections share one port.

- MSG:  a JSON object. Host to guest: `{"op": ...}`; guest to host: `{"ev": ...}`.
- DATA: first byte is the stream (IN, OUT, ERR), the rest is payload; an empty
  payload ends that stream (EOF).
- ACK:  4 bytes, the number of DATA bytes the receiver has consumed. A sender
  keeps at most WINDOW unacknowledged bytes in flight per channel, so a slow
  consumer on either side stops the producer instead of growing a buffer.
"""

from __future__ import annotations

import json
import struct
from typing import Any

Msg = dict[str, Any]

HEADER = struct.Struct("!IBI")
MSG, DATA, ACK = 1, 2, 3
IN, OUT, ERR = 0, 1, 2
MAX_PAYLOAD = 256 * 1024
CHUNK = 64 * 1024
WINDOW = 1024 * 1024


class ProtocolError(Exception):
    pass


def msg(chan: int, obj: Msg) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return HEADER.pack(chan, MSG, len(body)) + body


def data(chan: int, stream: int, payload: bytes) -> bytes:
    return HEADER.pack(chan, DATA, len(payload) + 1) + bytes((stream,)) + payload


def ack(chan: int, n: int) -> bytes:
    return HEADER.pack(chan, ACK, 4) + struct.pack("!I", n)


class Parser:
    """Incremental frame parser: feed bytes, get (chan, kind, payload) tuples."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, chunk: bytes) -> list[tuple[int, int, bytes]]:
        self.buf += chunk
        out = []
        while len(self.buf) >= HEADER.size:
            chan, kind, n = HEADER.unpack_from(self.buf)
            if kind not in (MSG, DATA, ACK) or n > MAX_PAYLOAD + 1:
                raise ProtocolError(f"bad frame kind={kind} len={n}")
            if len(self.buf) < HEADER.size + n:
                break
            payload = bytes(self.buf[HEADER.size : HEADER.size + n])
            del self.buf[: HEADER.size + n]
            out.append((chan, kind, payload))
        return out


def decode_msg(payload: bytes) -> Msg:
    obj = json.loads(payload)
    if not isinstance(obj, dict):
        raise ProtocolError("message is not an object")
    return obj


def decode_ack(payload: bytes) -> int:
    if len(payload) != 4:
        raise ProtocolError("bad ack")
    return int(struct.unpack("!I", payload)[0])
