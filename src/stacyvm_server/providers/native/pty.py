"""Terminal execs: the pty master we hold, per runtime (OciRuntime.tty_mode).

crun (console_socket): with `terminal: true` in the process file and
`--console-socket <path>`, crun creates a pty inside the sandbox, makes its
slave the process's stdio and controlling terminal (the exec is a session
leader, so Ctrl-C typed into the line discipline reaches the foreground
process group), and sends the master to us over the unix socket with
SCM_RIGHTS.

runc (relay) and runsc (direct): runc takes a console socket only with
--detach (and then the exit status goes to the sandbox's init), runsc uses
one only with -detach. So the runtime client runs in the foreground with a
host pty as its stdin, stdout and stderr, as its controlling terminal, and we
hold the master (`open_host_pty`). runc creates the sandbox's pty itself and
copies between the two; it sets the host side raw but keeps output
post-processing there (`\n` becomes `\r\n` on the host side; it clears onlcr
inside) and passes a resize on when the kernel sends it SIGWINCH. runsc hands
the host pty to the sandbox as the process's terminal: its line discipline
and termios are the process's; a typed Ctrl-C becomes SIGINT for the client,
which runsc forwards to the sandbox's foreground job, and so does SIGWINCH.

Either way the master is non-blocking and read with the event loop's reader
callbacks; writes that would block wait for the fd to become writable
(backpressure onto the caller). Output ends when every slave fd is closed
(EIO), or shortly after the runtime client has exited (it waits for the
exec's main process), whichever comes first: a background child still
holding the terminal does not keep the exec open.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct
import termios
from collections.abc import AsyncIterator
from pathlib import Path

from stacyvm_server.errors import ProviderError
from stacyvm_server.providers.base import StreamName
from stacyvm_server.providers.native.process import READ_SIZE, NativeExecProcess

# After the main process exits, keep reading while output still arrives, but
# stop after this long without any (a background child may hold the pty).
_DRAIN_IDLE = 0.1
_EOT = b"\x04"  # VEOF in the default line discipline: "close stdin" for a terminal


def console_listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(1)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def receive_master(listener: socket.socket, proc: asyncio.subprocess.Process, timeout: float) -> int:
    """Accept the runtime's connection and take the pty master fd it sends."""
    loop = asyncio.get_running_loop()
    accept = asyncio.ensure_future(loop.sock_accept(listener))
    exited = asyncio.ensure_future(proc.wait())
    try:
        await asyncio.wait({accept, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        exited.cancel()
    if not accept.done():
        accept.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await accept
        why = "exited" if proc.returncode is not None else f"did not connect within {timeout:g}s"
        raise ProviderError(f"terminal exec failed: the runtime {why}")
    conn, _ = accept.result()
    with conn:
        conn.setblocking(True)
        conn.settimeout(timeout)
        try:
            _, fds, _, _ = await asyncio.to_thread(socket.recv_fds, conn, 4096, 4)
        except OSError as exc:
            raise ProviderError(f"terminal exec failed: no pty from the runtime: {exc}") from exc
    if not fds:
        raise ProviderError("terminal exec failed: the runtime sent no pty")
    for extra in fds[1:]:
        os.close(extra)
    os.set_blocking(fds[0], False)
    return fds[0]


def set_window_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def open_host_pty(rows: int, cols: int, relay: bool) -> tuple[int, int]:
    """A host pty for a runtime client's stdio: (master, slave); the master non-blocking.

    relay (runc): set the slave to the raw mode runc sets once it has the
    sandbox's pty (cfmakeraw, output post-processing kept), before runc
    starts: input typed earlier would otherwise be echoed by this side, and
    a Ctrl-C turned into SIGINT for runc, which then resets the terminal and
    exits 0. direct (runsc): the default termios, which are the process's own.
    """
    master, slave = os.openpty()
    try:
        set_window_size(master, rows, cols)
        if relay:
            iflag, oflag, cflag, lflag, ispeed, ospeed, cc = termios.tcgetattr(slave)
            iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
                       | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
            oflag |= termios.OPOST
            lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
            cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
            cc[termios.VMIN], cc[termios.VTIME] = 1, 0
            termios.tcsetattr(slave, termios.TCSANOW, [iflag, oflag, cflag, lflag, ispeed, ospeed, cc])
        os.set_blocking(master, False)
    except OSError:
        os.close(master)
        os.close(slave)
        raise
    return master, slave


class NativeTtyProcess(NativeExecProcess):
    """An exec whose stdio is a pty: one output stream (as "stdout"), stdin is typed input."""

    def __init__(self, *args: object, master: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._master: int | None = master

    def _fd(self) -> int:
        if self._master is None:
            raise BrokenPipeError("the terminal is closed")
        return self._master

    def _close_master(self) -> None:
        if self._master is not None:
            fd, self._master = self._master, None
            with contextlib.suppress(OSError):
                os.close(fd)

    async def _ready(self, writable: bool, timeout: float | None, also: asyncio.Future[int] | None = None) -> bool:
        """Wait until the master is readable (or writable); False on timeout or if `also` finished first."""
        loop = asyncio.get_running_loop()
        fd = self._fd()
        fut: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        (loop.add_writer if writable else loop.add_reader)(fd, ready)
        try:
            waits: set[asyncio.Future[object]] = {fut}  # type: ignore[arg-type]
            if also is not None:
                waits.add(also)  # type: ignore[arg-type]
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            return fut.done()
        finally:
            (loop.remove_writer if writable else loop.remove_reader)(fd)
            fut.cancel()

    async def output(self) -> AsyncIterator[tuple[StreamName, bytes]]:
        exited = asyncio.ensure_future(self._proc.wait())
        try:
            while self._master is not None:
                try:
                    data = os.read(self._master, READ_SIZE)
                except BlockingIOError:
                    if exited.done():
                        if not await self._ready(False, _DRAIN_IDLE):
                            break
                    else:
                        await self._ready(False, None, also=exited)
                    continue
                except OSError:  # EIO: every slave fd is closed
                    break
                if not data:
                    break
                yield "stdout", data
        finally:
            exited.cancel()
            self._close_master()

    async def write_stdin(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd(), view)
            except BlockingIOError:
                await self._ready(True, None)
                continue
            except OSError as exc:
                raise BrokenPipeError(f"the terminal is closed: {exc}") from exc
            view = view[n:]

    async def close_stdin(self) -> None:
        """A terminal has no separate stdin to close: type EOF (Ctrl-D) instead."""
        with contextlib.suppress(BrokenPipeError):
            await self.write_stdin(_EOT)

    async def resize(self, rows: int, cols: int) -> None:
        with contextlib.suppress(OSError):  # already closed: nothing to resize
            set_window_size(self._fd(), rows, cols)
