"""The HTTP server the preview benchmark runs inside a sandbox (stdlib only, Python 3).

Usage inside the sandbox: python3 preview_app.py PORT. HTTP/1.1 with keep-alive, one
asyncio loop, so a direct client and the proxy can both keep their connections:
  GET /small       13 bytes ("hello, world\\n"), Content-Length
  GET /big?n=N     N zero bytes, Content-Length, written in 256 KiB pieces with backpressure
Anything else is a 404. A request body (Content-Length only) is read and thrown away.
"""

import asyncio
import sys

SMALL = b"hello, world\n"
PIECE = memoryview(bytes(256 * 1024))


def head(status, length, close, ctype=b"text/plain"):
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
            + str(length).encode() + b"\r\n" + (b"Connection: close\r\n" if close else b"") + b"\r\n")


async def handle(reader, writer):
    try:
        while True:
            try:
                raw = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            line, _, rest = raw.partition(b"\r\n")
            parts = line.split(b" ")
            if len(parts) != 3:
                return
            target, version = parts[1], parts[2]
            fields = {}
            for h in rest.split(b"\r\n"):
                k, sep, v = h.partition(b":")
                if sep:
                    fields[k.strip().lower()] = v.strip().lower()
            close = fields.get(b"connection") == b"close" or version == b"HTTP/1.0"
            length = int(fields.get(b"content-length", b"0") or 0)
            if length:
                await reader.readexactly(length)
            path, _, query = target.partition(b"?")
            if path == b"/small":
                writer.write(head(b"200 OK", len(SMALL), close) + SMALL)
            elif path == b"/big":
                n = int(dict(p.partition(b"=")[::2] for p in query.split(b"&")).get(b"n", b"0") or 0)
                writer.write(head(b"200 OK", n, close, b"application/octet-stream"))
                while n > 0:
                    k = min(n, len(PIECE))
                    writer.write(PIECE[:k])
                    n -= k
                    await writer.drain()
            else:
                writer.write(head(b"404 Not Found", 10, close) + b"not found\n")
            await writer.drain()
            if close:
                return
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main(port):
    server = await asyncio.start_server(handle, "0.0.0.0", port, backlog=256)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
