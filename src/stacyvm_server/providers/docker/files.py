"""File helpers: tar streams for the archive API and the busybox scripts for the rest.

Reads and writes go through `GET/PUT /containers/{id}/archive`; Docker resolves
the path inside the container's root (a symlink to /etc is the container's
/etc, never the host's). Listing, moving, chmod and delete run the static
busybox we bind-mount at /.stacyvm/busybox, inside the container, so images
need not ship any tools and symlinks again resolve inside.
"""

from __future__ import annotations

import base64
import json
import posixpath
import re
import tarfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import IO

from stacyvm_server.errors import SandboxFileError
from stacyvm_server.providers.base import FileInfo

HELPER = "/.stacyvm/busybox"
CHUNK = 64 * 1024
BLOCK = 512

# Go's os.FileMode bits, as Docker reports them in X-Docker-Container-Path-Stat.
GO_DIR = 1 << 31
GO_SYMLINK = 1 << 27
GO_NOT_REGULAR = GO_DIR | GO_SYMLINK | (1 << 26) | (1 << 25) | (1 << 24) | (1 << 21) | (1 << 19)
GO_SETUID, GO_SETGID, GO_STICKY = 1 << 23, 1 << 22, 1 << 20


def norm(path: str) -> str:
    """Absolute, normalised; relative paths are taken from "/"."""
    return posixpath.normpath("/" + path.lstrip("/")) if path else "/"


def parse_path_stat(header: str) -> dict[str, object]:
    return dict(json.loads(base64.b64decode(header)))


def _unix_mode(go_mode: int) -> int:
    mode = go_mode & 0o777
    if go_mode & GO_SETUID:
        mode |= 0o4000
    if go_mode & GO_SETGID:
        mode |= 0o2000
    if go_mode & GO_STICKY:
        mode |= 0o1000
    return mode


def _parse_time(text: str) -> datetime:
    # Go prints up to 9 fractional digits; Python takes 6.
    text = re.sub(r"(\.\d{6})\d+", r"\1", text.replace("Z", "+00:00"))
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return datetime.now(UTC)
    return dt.astimezone(UTC)


def info_from_stat(path: str, st: dict[str, object]) -> FileInfo:
    go_mode = int(st.get("mode", 0))  # type: ignore[call-overload]
    return FileInfo(path=path, size=int(st.get("size", 0)),  # type: ignore[call-overload]
                    mode=_unix_mode(go_mode), is_dir=bool(go_mode & GO_DIR),
                    mod_time=_parse_time(str(st.get("mtime", ""))), is_symlink=bool(go_mode & GO_SYMLINK))


def is_dir(st: dict[str, object]) -> bool:
    return bool(int(st.get("mode", 0)) & GO_DIR)  # type: ignore[call-overload]


def is_symlink(st: dict[str, object]) -> bool:
    return bool(int(st.get("mode", 0)) & GO_SYMLINK)  # type: ignore[call-overload]


def is_regular(st: dict[str, object]) -> bool:
    return not int(st.get("mode", 0)) & GO_NOT_REGULAR  # type: ignore[call-overload]


# tar ------------------------------------------------------------------------------
def tar_header(name: str, size: int, mode: int, dir_entry: bool = False) -> bytes:
    ti = tarfile.TarInfo(name + ("/" if dir_entry else ""))
    ti.type = tarfile.DIRTYPE if dir_entry else tarfile.REGTYPE
    ti.size = 0 if dir_entry else size
    ti.mode = mode
    ti.mtime = int(time.time())
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    return ti.tobuf(format=tarfile.PAX_FORMAT)


async def tar_stream(dirs: list[str], name: str, spool: IO[bytes], size: int, mode: int) -> AsyncIterator[bytes]:
    """A tar with `dirs` (0755) then one regular file read from `spool`, in CHUNK pieces."""
    import asyncio

    for d in dirs:
        yield tar_header(d, 0, 0o755, dir_entry=True)
    yield tar_header(name, size, mode)
    spool.seek(0)
    sent = 0
    while sent < size:
        chunk = await asyncio.to_thread(spool.read, min(CHUNK, size - sent))
        if not chunk:
            raise SandboxFileError("spooled upload shrank while sending")
        sent += len(chunk)
        yield chunk
    pad = (-size) % BLOCK
    yield b"\0" * pad + b"\0" * (2 * BLOCK)


class _Reader:
    """Exact reads over an async byte iterator (the archive response body)."""

    def __init__(self, it: AsyncIterator[bytes]) -> None:
        self.it = it
        self.buf = bytearray()

    async def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = await anext(self.it, None)
            if chunk is None:
                raise SandboxFileError("truncated archive from docker")
            self.buf.extend(chunk)

    async def read(self, n: int) -> bytes:
        await self._fill(n)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def pieces(self, n: int) -> AsyncIterator[bytes]:
        """Up to n bytes in chunks as they arrive (constant memory)."""
        while n > 0:
            if not self.buf:
                await self._fill(1)
            take = min(n, len(self.buf), CHUNK)
            out = bytes(self.buf[:take])
            del self.buf[:take]
            n -= take
            yield out


def _pax_size(data: bytes) -> int | None:
    size = None
    for rec in data.split(b"\n"):
        _, _, kv = rec.partition(b" ")
        if kv.startswith(b"size="):
            size = int(kv[5:])
    return size


async def first_file(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Stream the data of the first regular-file entry of a tar stream."""
    r = _Reader(body)
    pax_size: int | None = None
    while True:
        hdr = await r.read(BLOCK)
        if hdr == b"\0" * BLOCK:
            raise SandboxFileError("empty archive from docker")
        typ = hdr[156:157]
        raw = hdr[124:136]
        size = int.from_bytes(raw[1:], "big") if raw[0] & 0x80 else int(raw.strip(b"\0 ") or b"0", 8)
        if typ in (b"x", b"g", b"L", b"K"):
            data = await r.read(size + ((-size) % BLOCK))
            if typ == b"x":
                pax_size = _pax_size(data[:size])
            continue
        if pax_size is not None:
            size, pax_size = pax_size, None
        if typ not in (b"0", b"\0", b"7"):
            raise SandboxFileError("not a regular file")
        async for piece in r.pieces(size):
            yield piece
        return


# busybox scripts (run as `busybox sh -c SCRIPT stacyvm ARGS...`) ----------------------
LIST_SCRIPT = r"""B=/.stacyvm/busybox
p=$1
[ -e "$p" ] || [ -L "$p" ] || { echo "no such file or directory: $p" >&2; exit 2; }
[ -d "$p" ] || { echo "not a directory: $p" >&2; exit 20; }
cd -- "$p" || exit 13
for f in .* *; do
  [ "$f" = . ] || [ "$f" = .. ] && continue
  [ -e "$f" ] || [ -L "$f" ] || continue
  $B stat -c '%f %s %Y %n' -- "$f"
done
"""

MOVE_SCRIPT = r"""B=/.stacyvm/busybox
[ -e "$1" ] || [ -L "$1" ] || { echo "no such file or directory: $1" >&2; exit 2; }
$B mkdir -p -- "$($B dirname -- "$2")" && exec $B mv -f -- "$1" "$2"
"""

CHMOD_SCRIPT = r"""B=/.stacyvm/busybox
[ -e "$2" ] || { echo "no such file or directory: $2" >&2; exit 2; }
exec $B chmod "$1" -- "$2"
"""

# write_file under runsc: gVisor caches the root's dentries and file contents, so a
# change made from the host (the archive API) is not seen inside. The bytes come in
# on stdin instead; the file is written next to its target and renamed over it.
WRITE_SCRIPT = r"""B=/.stacyvm/busybox
p=$1
d=$($B dirname -- "$p")
$B mkdir -p -- "$d" 2>/dev/null
[ -d "$d" ] || { echo "not a directory: $d" >&2; exit 20; }
[ -d "$p" ] && [ ! -L "$p" ] && { echo "is a directory: $p" >&2; exit 21; }
t="$d/.stacyvm-upload.$$"
$B cat > "$t" || { $B rm -f -- "$t"; exit 1; }
$B chmod "$2" -- "$t" || { $B rm -f -- "$t"; exit 1; }
[ -L "$p" ] && $B rm -f -- "$p"
exec $B mv -f -- "$t" "$p"
"""

DELETE_SCRIPT = r"""B=/.stacyvm/busybox
p=$1
[ -e "$p" ] || [ -L "$p" ] || exit 0
if [ -d "$p" ] && [ ! -L "$p" ]; then
  [ "$2" = 1 ] || { echo "is a directory (recursive delete needed): $p" >&2; exit 21; }
  exec $B rm -rf -- "$p"
fi
exec $B rm -f -- "$p"
"""


def parse_listing(dir_path: str, out: bytes) -> list[FileInfo]:
    items = []
    for line in out.decode(errors="surrogateescape").splitlines():
        parts = line.split(" ", 3)
        if len(parts) != 4:
            continue
        raw_mode, size, mtime, name = int(parts[0], 16), int(parts[1]), int(parts[2]), parts[3]
        kind = raw_mode & 0o170000
        items.append(FileInfo(path=posixpath.join(dir_path, name), size=size, mode=raw_mode & 0o7777,
                              is_dir=kind == 0o040000, mod_time=datetime.fromtimestamp(mtime, UTC),
                              is_symlink=kind == 0o120000))
    return sorted(items, key=lambda f: f.path)


# kill() under runsc: the exec's processes live inside the gVisor Sentry, out of the
# host's reach. Run inside as root: find the sessions of the processes that carry the
# exec's marker (STACYVM_EXEC=<token> in their environment), then SIGKILL every live
# process of those sessions, rescanning until a pass finds none. The script's own exec
# is a session of its own without the marker. Builtins only, except grep per process.
INNER_KILL_SCRIPT = r"""B=/.stacyvm/busybox
tok="STACYVM_EXEC=$1"
sids=""
for f in /proc/[0-9]*/environ; do
  $B grep -qxzF "$tok" "$f" 2>/dev/null || continue
  read -r l < "${f%environ}stat" 2>/dev/null || continue
  set -- ${l##*) }
  [ "$4" -gt 1 ] 2>/dev/null && sids="$sids $4"
done
[ -n "$sids" ] || exit 0
i=0
while [ $i -lt 100 ]; do
  n=0
  for f in /proc/[0-9]*/stat; do
    read -r l < "$f" 2>/dev/null || continue
    set -- ${l##*) }
    [ "$1" != Z ] && [ "$1" != X ] || continue
    for s in $sids; do
      [ "$4" = "$s" ] || continue
      p=${f#/proc/}; p=${p%/stat}
      kill -9 "$p" 2>/dev/null && n=$((n+1))
    done
  done
  [ $n -eq 0 ] && exit 0
  i=$((i+1))
done
exit 1
"""

# runsc: signal() of an exec's main process from inside the sandbox. It is the one
# process carrying the exec's token whose pid is its session id (gVisor makes each exec
# a session leader, as runc does); $1 = token, $2 = signal number.
INNER_SIGNAL_SCRIPT = r"""tok="STACYVM_EXEC=$1"
sig=$2
for f in /proc/[0-9]*/environ; do
  /.stacyvm/busybox grep -qxzF "$tok" "$f" 2>/dev/null || continue
  read -r l < "${f%environ}stat" 2>/dev/null || continue
  p=${f#/proc/}; p=${p%/environ}
  set -- ${l##*) }
  [ "$1" != Z ] && [ "$4" = "$p" ] && kill -"$sig" "$p" 2>/dev/null
done
exit 0
"""
