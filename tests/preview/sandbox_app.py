"""A stdlib-only HTTP + WebSocket test server, written into sandboxes by the preview tests.

Usage inside the sandbox: python3 app.py PORT [BIND]. Routes:
  GET /            an HTML page whose script echoes a message over /ws and shows it
  GET /big?n=N     N bytes (Content-Length) ; /bigchunked?n=N: the same, chunked
  POST /upload     reads the body (Content-Length or chunked), answers "<bytes> <sha256>"
  GET /sse         5 server-sent events, 300 ms apart
  GET /headers     the request headers as JSON
  GET /ws          WebSocket echo (text and binary)
"""

import asyncio
import base64
import hashlib
import json
import struct
import sys

PAGE = b"""<!doctype html><html><head><title>preview test</title></head><body>
<h1>StacyVM preview</h1><p id="status">connecting</p><p id="echo"></p>
<script>
const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
ws.onopen = () => { document.getElementById("status").textContent = "open"; ws.send("hello from the browser"); };
ws.onmessage = (e) => { document.getElementById("echo").textContent = "echo: " + e.data; };
ws.onerror = () => { document.getElementById("status").textContent = "error"; };
</script></body></html>"""


async def read_head(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return method, target, headers


def respond(writer, status, body, ctype="text/plain", extra=""):
    writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n{extra}"
                 "Connection: close\r\n\r\n".encode() + body)


async def body_chunks(reader, headers):
    if "content-length" in headers:
        left = int(headers["content-length"])
        while left:
            data = await reader.read(min(left, 65536))
            if not data:
                return
            left -= len(data)
            yield data
    elif "chunked" in headers.get("transfer-encoding", ""):
        while True:
            size = int((await reader.readline()).split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readline()
                return
            left = size
            while left:
                data = await reader.read(min(left, 65536))
                left -= len(data)
                yield data
            await reader.readline()


async def websocket(reader, writer, headers):
    key = headers["sec-websocket-key"]
    accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    while True:
        b1, b2 = await reader.readexactly(2)
        opcode, n = b1 & 0x0F, b2 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await reader.readexactly(8))
        mask = await reader.readexactly(4) if b2 & 0x80 else b"\0\0\0\0"
        data = bytes(c ^ mask[i % 4] for i, c in enumerate(await reader.readexactly(n)))
        if opcode == 8:
            writer.write(b"\x88" + bytes([len(data)]) + data)
            await writer.drain()
            return
        if opcode in (1, 2):
            if len(data) < 126:
                head = bytes([0x80 | opcode, len(data)])
            elif len(data) < 65536:
                head = bytes([0x80 | opcode, 126]) + struct.pack("!H", len(data))
            else:
                head = bytes([0x80 | opcode, 127]) + struct.pack("!Q", len(data))
            writer.write(head + data)
            await writer.drain()


async def handle(reader, writer):
    try:
        _method, target, headers = await read_head(reader)
        path, _, query = target.partition("?")
        if path == "/ws" and headers.get("upgrade", "").lower() == "websocket":
            await websocket(reader, writer, headers)
        elif path == "/":
            respond(writer, "200 OK", PAGE, "text/html; charset=utf-8")
        elif path == "/headers":
            respond(writer, "200 OK", json.dumps({**headers, "_target": target}).encode(), "application/json")
        elif path in ("/big", "/bigchunked"):
            n = int(query.split("=", 1)[1])
            chunk = b"x" * 65536
            if path == "/big":
                writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n".encode())
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
            while n:
                part = chunk[: min(n, len(chunk))]
                n -= len(part)
                writer.write(part if path == "/big" else b"%x\r\n%s\r\n" % (len(part), part))
                await writer.drain()
            if path == "/bigchunked":
                writer.write(b"0\r\n\r\n")
        elif path == "/upload":
            h, total = hashlib.sha256(), 0
            async for data in body_chunks(reader, headers):
                h.update(data)
                total += len(data)
            respond(writer, "200 OK", f"{total} {h.hexdigest()}".encode())
        elif path == "/sse":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                         b"Connection: close\r\n\r\n")
            for i in range(5):
                writer.write(f"data: event {i}\n\n".encode())
                await writer.drain()
                await asyncio.sleep(0.3)
        else:
            respond(writer, "404 Not Found", b"no such page")
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main():
    port = int(sys.argv[1])
    bind = sys.argv[2] if len(sys.argv) > 2 else "0.0.0.0"
    server = await asyncio.start_server(handle, bind, port)
    async with server:
        await server.serve_forever()


asyncio.run(main())
