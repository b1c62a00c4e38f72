"""`stacyvm exec -it` driven through a real pseudo-terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import sys
import termios
import time

from tests.conftest import ServerProc


def _read_until(fd: int, needle: bytes, buf: bytearray, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while needle not in buf:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} not seen in {bytes(buf)!r}"
        r, _, _ = select.select([fd], [], [], left)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                chunk = b""
            assert chunk, f"EOF before {needle!r}: {bytes(buf)!r}"
            buf += chunk


def _spawn_cli(argv: list[str], rows: int = 30, cols: int = 100) -> tuple[int, int]:
    pid, fd = pty.fork()
    if pid == 0:  # child: the CLI on the pty's slave side
        try:
            os.execvpe(sys.executable, [sys.executable, "-m", "stacyvm_server", *argv],
                       {k: v for k, v in os.environ.items() if not k.startswith("STACYVM_")})
        finally:
            os._exit(127)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    return pid, fd


def _exit_code(pid: int, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, 9)
    raise AssertionError("the CLI did not exit")


def test_exec_it_sh(open_server: ServerProc, box: str) -> None:
    pid, fd = _spawn_cli(["exec", "-it", "--url", open_server.base_url, box, "--", "sh"], rows=30, cols=100)
    buf = bytearray()
    try:
        _read_until(fd, b"# ", buf)  # the remote shell's prompt
        os.write(fd, b"echo hi-$((1+2)); stty size\n")
        _read_until(fd, b"hi-3", buf)
        _read_until(fd, b"30 100", buf)  # the local terminal's size reached the remote pty
        # A local resize (SIGWINCH to the CLI) reaches the remote terminal.
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        time.sleep(0.3)
        os.write(fd, b"stty size\n")
        _read_until(fd, b"40 120", buf)
        # Ctrl-C goes to the remote foreground job, not to the CLI.
        os.write(fd, b"sleep 100\n")
        time.sleep(0.5)
        os.write(fd, b"\x03")
        os.write(fd, b"echo after-$((2+2))\n")
        _read_until(fd, b"after-4", buf)
        os.write(fd, b"exit 3\n")
        assert _exit_code(pid) == 3
    finally:
        os.close(fd)


def test_exec_it_unknown_sandbox(open_server: ServerProc) -> None:
    pid, fd = _spawn_cli(["exec", "-it", "--url", open_server.base_url, "sb_doesnotexist", "--", "sh"])
    buf = bytearray()
    try:
        _read_until(fd, b"404", buf)
        assert _exit_code(pid) == 1
    finally:
        os.close(fd)
