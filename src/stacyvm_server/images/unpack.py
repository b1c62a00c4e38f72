"""Apply image layers to a directory, safely, in constant memory.

Every write goes through directory fds opened with O_NOFOLLOW, one component at a
time from the root, so no entry can reach outside the root: not with `..`, not
with an absolute name, and not through a symlink an earlier entry created.
A layer that tries any of that is refused as a whole (ImageError).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, cast

from stacyvm_server.errors import ImageError

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to chown


def apply_layer(layer: Path, root: Path, uid_shift: int = 0) -> int:
    """Apply one layer blob (tar, tar+gzip, tar+zstd) onto root; return bytes of files written."""
    with _open_stream(layer) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        return _Applier(root, uid_shift).apply(tar)


@contextmanager
def _open_stream(layer: Path) -> Iterator[IO[bytes]]:
    # Sniff the compression: media types lie (docker save layers, OCI "tar" that is gzip).
    with open(layer, "rb") as raw:
        magic = raw.read(4)
        raw.seek(0)
        if magic.startswith(_GZIP_MAGIC):
            import gzip

            with gzip.GzipFile(fileobj=raw) as gz:
                yield cast(IO[bytes], gz)
        elif magic == _ZSTD_MAGIC:
            try:
                import zstandard
            except ImportError:
                raise ImageError(f"layer {layer.name} is zstd-compressed; install 'zstandard'") from None
            with zstandard.ZstdDecompressor().stream_reader(raw) as zs:
                yield zs
        else:
            yield raw


def clean_name(name: str) -> list[str]:
    """Split a tar member name into safe components, refusing absolute names and `..`."""
    if name.startswith("/"):
        raise ImageError(f"layer entry {name!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageError(f"layer entry {name!r} escapes the root with '..'")
    return parts


class _Applier:
    def __init__(self, root: Path, uid_shift: int) -> None:
        if uid_shift < 0:
            raise ImageError(f"uid_shift must be >= 0, not {uid_shift}")
        self.root = root
        self.shift = uid_shift
        self.written = 0
        # Paths this layer created: whiteouts only hide what lower layers made.
        self.this_layer: set[tuple[str, ...]] = set()

    def apply(self, tar: tarfile.TarFile) -> int:
        try:
            for member in tar:
                self._entry(tar, member)
        except (tarfile.TarError, EOFError) as exc:
            raise ImageError(f"corrupt layer: {exc}") from exc
        return self.written

    def _entry(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = clean_name(m.name)
        if not parts:
            return  # the root itself ("./"): keep the root we made
        if m.ischr() or m.isblk() or m.isfifo():
            return  # device nodes and fifos never come from an image; the runtime makes /dev
        base = parts[-1]
        if base.startswith(WHITEOUT) and not self._parent_exists(parts):
            return  # nothing below to hide; do not create the directories
        with self._parent(parts) as pfd:
            if base == OPAQUE:
                self._clear_lower(pfd, tuple(parts[:-1]))
                return
            if base.startswith(WHITEOUT):
                hidden = (*parts[:-1], base[len(WHITEOUT) :])
                if hidden not in self.this_layer:
                    _remove(pfd, base[len(WHITEOUT) :])
                return
            self.this_layer.add(tuple(parts))
            if m.isdir():
                self._dir(pfd, base, m)
            elif m.isreg():
                self._file(tar, pfd, base, m)
            elif m.issym():
                _remove(pfd, base)
                os.symlink(m.linkname, base, dir_fd=pfd)
                os.chown(base, *self._ids(m), dir_fd=pfd, follow_symlinks=False)
            elif m.islnk():
                self._hardlink(pfd, base, m)

    def _parent_exists(self, parts: list[str]) -> bool:
        try:
            with self._parent(parts, create=False):
                return True
        except FileNotFoundError:
            return False

    @contextmanager
    def _parent(self, parts: list[str], create: bool = True) -> Iterator[int]:
        """An fd for the entry's parent directory, creating missing directories."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i, comp in enumerate(parts[:-1]):
                try:
                    nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(comp, 0o755, dir_fd=fd)
                    os.chown(comp, self.shift, self.shift, dir_fd=fd, follow_symlinks=False)
                    nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        where = "/".join(parts[: i + 1])
                        raise ImageError(
                            f"layer entry {'/'.join(parts)!r} goes through {where!r}, "
                            "which is a symlink or not a directory"
                        ) from None
                    raise
                os.close(fd)
                fd = nfd
            yield fd
        finally:
            os.close(fd)

    def _ids(self, m: tarfile.TarInfo) -> tuple[int, int]:
        uid, gid = m.uid + self.shift, m.gid + self.shift
        if uid > _MAX_ID or gid > _MAX_ID:
            raise ImageError(f"layer entry {m.name!r}: uid/gid {m.uid}/{m.gid} too large to shift")
        return uid, gid

    def _dir(self, pfd: int, base: str, m: tarfile.TarInfo) -> None:
        try:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(base, dir_fd=pfd)
                os.mkdir(base, 0o700, dir_fd=pfd)
        except FileNotFoundError:
            os.mkdir(base, 0o700, dir_fd=pfd)
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=pfd)
        try:
            os.fchown(fd, *self._ids(m))
            os.fchmod(fd, stat.S_IMODE(m.mode))  # after chown: chown clears setgid
        finally:
            os.close(fd)

    def _file(self, tar: tarfile.TarFile, pfd: int, base: str, m: tarfile.TarInfo) -> None:
        _remove(pfd, base)
        src = tar.extractfile(m)
        assert src is not None  # a regular member always has data
        fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=pfd)
        try:
            with os.fdopen(fd, "wb", closefd=False) as out:
                shutil.copyfileobj(src, out, _CHUNK)
            os.fchown(fd, *self._ids(m))
            os.fchmod(fd, stat.S_IMODE(m.mode))  # after chown: chown clears setuid
            os.utime(fd, (m.mtime, m.mtime))
        finally:
            os.close(fd)
        self.written += m.size

    def _hardlink(self, pfd: int, base: str, m: tarfile.TarInfo) -> None:
        target = clean_name(m.linkname)  # refuses absolute and `..` targets
        if not target:
            raise ImageError(f"layer entry {m.name!r} hard-links to the root")
        with self._parent(target) as tfd:
            try:
                st = os.stat(target[-1], dir_fd=tfd, follow_symlinks=False)
            except FileNotFoundError:
                raise ImageError(f"layer entry {m.name!r} hard-links to missing {m.linkname!r}") from None
            if stat.S_ISDIR(st.st_mode):
                raise ImageError(f"layer entry {m.name!r} hard-links to a directory")
            _remove(pfd, base)
            os.link(target[-1], base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)

    def _clear_lower(self, dfd: int, dir_parts: tuple[str, ...]) -> None:
        """Opaque directory: drop every child that lower layers made, keep this layer's."""
        for name in os.listdir(dfd):
            child = (*dir_parts, name)
            if child not in self.this_layer:
                _remove(dfd, name)
                continue
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                cfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
                try:
                    self._clear_lower(cfd, child)
                finally:
                    os.close(cfd)


def _remove(pfd: int, name: str) -> None:
    """Remove whatever is at name (file, symlink or whole tree) without following symlinks."""
    try:
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=pfd)
    else:
        os.unlink(name, dir_fd=pfd)
