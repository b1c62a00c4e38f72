"""An exec inside a microVM: one agent channel carrying output, stdin and the exit."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from stacyvm_server.errors import BadRequest
from stacyvm_server.providers.base import ExecProcess, ExitStatus, StreamName
from stacyvm_server.providers.microvm import protocol as P
from stacyvm_server.providers.microvm.channel import Channel

_NAMES: dict[int, StreamName] = {P.OUT: "stdout", P.ERR: "stderr"}


class MicroVMExec(ExecProcess):
    def __init__(self, ch: Channel, tty: bool, stdin: bool) -> None:
        self.ch = ch
        self.tty = tty
        self.has_stdin = stdin
        self._status: asyncio.Future[ExitStatus] = asyncio.get_running_loop().create_future()
        self._killed = False
        self._reading = False
        self._discard: asyncio.Task[None] | None = None

    async def output(self) -> AsyncIterator[tuple[StreamName, bytes]]:
        self._reading = True
        try:
            while True:
                kind, ev = await self.ch.next()
                if kind == "msg":
                    if ev.get("ev") == "exit":
                        self._finish(ev)
                        return
                    continue
                stream, chunk = ev
                if chunk:
                    yield _NAMES.get(stream, "stdout"), chunk
                    self.ch.consumed(len(chunk))
        except BaseException as exc:
            if not self._status.done():
                self._status.set_exception(exc)
                self._status.exception()  # retrieved: wait() re-raises it if anyone asks
            raise
        finally:
            self.ch.close()

    def _finish(self, ev: dict[str, object]) -> None:
        sig = ev.get("signal")
        reason = "oom" if ev.get("oom") else ("killed" if self._killed and sig is not None else None)
        if not self._status.done():
            self._status.set_result(ExitStatus(int(ev["code"]), int(sig) if sig is not None else None, reason))  # type: ignore[call-overload]

    async def wait(self) -> ExitStatus:
        if not self._reading:
            # Nobody reads the output: drop it, or the guest's window fills and the
            # process can never exit. A task, so a cancelled wait() does not stop it.
            self._reading = True
            self._discard = asyncio.create_task(self._drop_output())
        return await asyncio.shield(self._status)

    async def _drop_output(self) -> None:
        with contextlib.suppress(Exception):
            async for _ in self.output():
                pass

    async def kill(self) -> None:
        if not self._status.done() and self.ch.id in self.ch.conn.channels:
            self._killed = True
            self.ch.send_msg({"op": "kill"})

    async def write_stdin(self, data: bytes) -> None:
        if not self.has_stdin:
            raise BadRequest("this exec was started without stdin")
        if data:
            await self.ch.send_data(data)

    async def close_stdin(self) -> None:
        if self.has_stdin:
            await self.ch.send_data(b"")

    async def resize(self, rows: int, cols: int) -> None:
        if not self.tty:
            await super().resize(rows, cols)
            return
        self.ch.send_msg({"op": "resize", "rows": rows, "cols": cols})

    async def signal(self, sig: int) -> None:
        self.ch.send_msg({"op": "signal", "sig": sig})
