"""`stacyvm exec -it`: an interactive exec over the WebSocket protocol (docs/interactive.md).

With a terminal (-t) the local terminal goes to raw mode, so every key (Ctrl-C
included) goes to the remote pty; SIGWINCH becomes a `resize` message. The
terminal is restored on every way out. The remote command's exit code becomes
ours (128+N when it died of signal N).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import sys
import termios
import tty as ttymod
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

READ = 64 * 1024


def ws_url(base: str, sandbox_id: str) -> str:
    scheme, _, rest = base.rstrip("/").partition("://")
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/api/v1/sandboxes/{sandbox_id}/exec/ws"


def run(base_url: str, headers: dict[str, str], sandbox_id: str, start: dict[str, Any], tty: bool) -> int:
    fd = sys.stdin.fileno()
    raw = tty and os.isatty(fd)
    saved = termios.tcgetattr(fd) if raw else None
    try:
        if raw:
            ttymod.setraw(fd, termios.TCSANOW)  # keep what was typed ahead
        return asyncio.run(_session(base_url, headers, sandbox_id, start, tty))
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _size() -> tuple[int, int]:
    size = shutil.get_terminal_size()
    return size.lines, size.columns


async def _session(base_url: str, headers: dict[str, str], sandbox_id: str, start: dict[str, Any], tty: bool) -> int:
    try:
        async with connect(ws_url(base_url, sandbox_id), additional_headers=headers, max_size=None) as ws:
            msg: dict[str, Any] = {"type": "start", **start, "tty": tty, "stdin": True, "binary": True}
            if tty:
                msg["rows"], msg["cols"] = _size()
            await ws.send(json.dumps(msg))
            return await _relay(ws, tty)
    except InvalidStatus as exc:
        body = exc.response.body.decode(errors="replace") if exc.response.body else ""
        try:
            body = json.loads(body).get("message", body)
        except ValueError:
            pass
        sys.stderr.write(f"error: {exc.response.status_code}: {body}\n")
        return 1
    except OSError as exc:
        sys.stderr.write(f"error: cannot reach the server at {base_url}: {exc}\n")
        return 1


async def _relay(ws: ClientConnection, tty: bool) -> int:
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()
    pending: set[asyncio.Task[None]] = set()

    def spawn(coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        pending.add(task)
        task.add_done_callback(pending.discard)

    async def send(m: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps(m))

    def on_stdin() -> None:
        try:
            data = os.read(fd, READ)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            spawn(send({"type": "close_stdin"}))
            return
        spawn(send({"type": "stdin", "data_b64": base64.b64encode(data).decode()}))

    loop.add_reader(fd, on_stdin)
    if tty:
        loop.add_signal_handler(
            signal.SIGWINCH, lambda: spawn(send({"type": "resize", "rows": _size()[0], "cols": _size()[1]}))
        )
    code = 1
    try:
        async for raw in ws:
            m = json.loads(raw)
            kind = m.get("type")
            if kind in ("stdout", "output", "stderr"):
                data = base64.b64decode(m["data_b64"]) if "data_b64" in m else m.get("data", "").encode()
                os.write(2 if kind == "stderr" else 1, data)
            elif kind == "exit":
                code = int(m.get("exit_code", 1))
                break
            elif kind == "error":
                sys.stderr.write(f"\r\nerror: {m.get('message')}\r\n")
    except ConnectionClosed:
        pass
    finally:
        loop.remove_reader(fd)
        if tty:
            loop.remove_signal_handler(signal.SIGWINCH)
        for t in pending:
            t.cancel()
    return code
