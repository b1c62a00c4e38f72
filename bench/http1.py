"""One small blocking HTTP/1.1 client for the timed JSON calls of both sides.

A benchmark that puts our server beside raw Docker API calls must measure both
with the same instrument: the same client code, one kept-alive connection per
thread, JSON bodies, Content-Length or chunked responses. Only the socket
differs (TCP to our server, the unix socket to dockerd). httpx is kept for
streams, files and previews; its own cost per call (measured and reported as
`http_health_httpx` next to `http_health`) belongs to the client library.
"""

from __future__ import annotations

import json
import socket
from typing import Any

TIMEOUT = 300.0


class Http1Conn:
    """HTTP/1.1 calls on one kept-alive connection, reopened when the peer closed it."""

    def __init__(self, *, unix_path: str | None = None, tcp: tuple[str, int] | None = None,
                 host: str = "localhost", prefix: str = "", headers: dict[str, str] | None = None,
                 timeout: float = TIMEOUT) -> None:
        if (unix_path is None) == (tcp is None):
            raise ValueError("give exactly one of unix_path and tcp")
        self.unix_path, self.tcp, self.prefix, self.timeout = unix_path, tcp, prefix, timeout
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._head_tail = f"Host: {host}\r\n{extra}Content-Type: application/json\r\n"
        self.sock: socket.socket | None = None
        self.buf = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _connect(self) -> socket.socket:
        if self.unix_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            sock.connect(self.unix_path)
            return sock
        assert self.tcp is not None
        sock = socket.create_connection(self.tcp, timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as httpx and every HTTP client
        return sock

    def call(self, method: str, target: str, body: Any = None) -> tuple[int, bytes]:
        """(status, body) of one request; `body` is sent as JSON when given."""
        payload = b"" if body is None else json.dumps(body).encode()
        head = (f"{method} {self.prefix}{target} HTTP/1.1\r\n{self._head_tail}"
                f"Content-Length: {len(payload)}\r\n\r\n").encode()
        for attempt in (0, 1):
            fresh = self.sock is None
            if self.sock is None:
                self.sock = self._connect()
                self.buf = b""
            try:
                self.sock.sendall(head + payload)
                return self._response(method)
            except (ConnectionError, EOFError):
                self.close()
                if fresh or attempt:
                    raise
        raise AssertionError("unreachable")

    def _fill(self) -> None:
        assert self.sock is not None
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("the server closed the connection")
        self.buf += chunk

    def _until(self, sep: bytes) -> bytes:
        while sep not in self.buf:
            self._fill()
        out, _, self.buf = self.buf.partition(sep)
        return out

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _response(self, method: str) -> tuple[int, bytes]:
        lines = self._until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if method == "HEAD" or status in (204, 304):
            data = b""
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while size := int(self._until(b"\r\n").split(b";")[0], 16):
                parts.append(self._exactly(size))
                self._exactly(2)
            while self._until(b"\r\n"):  # trailers, then the empty line
                pass
            data = b"".join(parts)
        else:
            data = self._exactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, data
